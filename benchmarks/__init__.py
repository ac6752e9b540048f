"""Benchmarks of the trainer and the surgery library (`make bench`).

Each benchmark module has `NAME` and `run(size) -> {'figures', 'details'}`;
`run_benchmark` adds the environment and the figures measured before the
performance changes (before.json), and writes `<out_dir>/<name>.json`.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

from benchmarks import common

ALL = ('step', 'loop', 'freeze', 'surgery', 'donor', 'cold_start', 'guard',
       'nnx_step', 'adam_state')
BEFORE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      'before.json')


def _before() -> dict[str, dict[str, float]]:
  if not os.path.exists(BEFORE):
    return {}
  with open(BEFORE) as f:
    return json.load(f)['figures']


def run_benchmark(name: str, tiny: bool = False,
                  out_dir: str = common.RESULTS) -> dict[str, Any]:
  """Runs one benchmark and writes its JSON; returns the result.

  Args:
    name: one of ALL.
    tiny: smoke-test size (a few steps, one repeat).
    out_dir: where `<name>.json` goes.

  Returns:
    {'figures': [...], 'details': {...}, 'environment': {...}, 'size': ...}.
  """
  if name not in ALL:
    raise KeyError(f'unknown benchmark {name!r}; known: {list(ALL)}')
  module = importlib.import_module(f'benchmarks.{name}')
  size = common.TINY if tiny else common.FULL
  result = module.run(size)
  before = _before().get(name, {})
  for fig in result['figures']:
    if fig['figure'] in before and not tiny:
      fig['before'] = before[fig['figure']]
  from trainer import host  # pylint: disable=g-import-not-at-top
  result['environment'] = host.environment()
  result['size'] = 'tiny' if tiny else 'full'
  common.write_result(out_dir, name, result)
  return result
