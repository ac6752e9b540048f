"""`cold_start`: process start to the end of the first train step.

Each run is a fresh `python` process that runs the trainer's command line
(`trainer.__main__.main`: flags, config, data, state, step-0 checkpoint,
first step) on the default config for one step. The clock starts in the
parent just before the process is spawned and stops at the trainer's log
record 'First step of this run done' (its creation time; the child exits
there), so interpreter start and every import count. Two kinds, alternated: without the
persistent compilation cache (`cold`) and with a cache that an earlier run
filled (`warm`, `config.compilation_cache_dir`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from benchmarks import common

NAME = 'cold_start'
_MARK = 'First step of this run done'


def _child(workdir: str, cache_dir: str) -> None:
  """Runs the trainer's main; prints its timestamps and exits at step 1."""
  marks: dict[str, float] = {}

  class Catch(logging.Handler):

    def emit(self, record: logging.LogRecord) -> None:
      if record.getMessage().startswith(_MARK):
        marks['first_step'] = record.created
        # What follows the first step (eval, checkpoint, TensorFlow for the
        # metric writer) is not measured: stop here.
        print(json.dumps(marks), flush=True)
        os._exit(0)  # pylint: disable=protected-access

  from trainer.__main__ import main  # pylint: disable=g-import-not-at-top
  marks['imported'] = time.time()
  logging.getLogger('absl').addHandler(Catch())
  argv = ['trainer', '--config=configs/default.py', f'--workdir={workdir}',
          '--config.data_source=embedded', '--config.num_train_steps=2',
          '--config.progress_bar=off',
          f'--config.compilation_cache_dir={cache_dir}']
  code = main(argv)
  raise SystemExit(f'trainer exited with {code} before its first step was '
                   f'logged; marks {marks}')


def _spawn(cache_dir: str) -> dict[str, float]:
  workdir = tempfile.mkdtemp(prefix='bench-cold-')
  try:
    start = time.time()
    marks = common.run_child(['-m', 'benchmarks.cold_start', workdir,
                              cache_dir])
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  return {k: v - start for k, v in marks.items()}


def run(size: common.Size) -> dict[str, Any]:
  """Primes a cache, then alternates cold and warm processes.

  At the tiny size the first cold run (into an empty cache) primes it.
  """
  pairs = 1 if size.tiny else 3
  cache = tempfile.mkdtemp(prefix='bench-jax-cache-')
  try:
    runs: dict[str, list[dict[str, float]]] = {'cold': [], 'warm': []}
    if size.tiny:
      runs['cold'].append(_spawn(cache))
      runs['warm'].append(_spawn(cache))
      pairs = 0
    else:
      _spawn(cache)  # Fills the cache (and the OS file cache for imports).
    for i in range(pairs):
      for kind in (('cold', 'warm') if i % 2 == 0 else ('warm', 'cold')):
        runs[kind].append(_spawn('' if kind == 'cold' else cache))
  finally:
    shutil.rmtree(cache, ignore_errors=True)
  first = {k: common.median([r['first_step'] for r in rs])
           for k, rs in runs.items()}
  imported = {k: common.median([r['imported'] for r in rs])
              for k, rs in runs.items()}
  ratio = first['warm'] / first['cold']
  cmd = common.command(NAME)
  return {
      'figures': [
          common.figure('warm / cold: process start to end of first step',
                        ratio, 'x', '<= 0.5', ratio <= 0.5, cmd),
          common.figure('cold (no compilation cache)', first['cold'], 's',
                        '-', None, cmd),
          common.figure('warm (persistent compilation cache)', first['warm'],
                        's', '-', None, cmd),
          common.figure('of which: interpreter start and imports (warm)',
                        imported['warm'], 's', '-', None, cmd),
      ],
      'details': {'runs': runs},
  }


if __name__ == '__main__':
  _child(sys.argv[1], sys.argv[2])
