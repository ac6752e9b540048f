"""`loop`: a whole epoch through the trainer's loop against its pure steps.

A side: `trainer.train.train_loop` (data order and batching, placement on
the mesh, steps, metrics merged on device and written once an epoch, the
non-finite guard, clu progress report, the tqdm bar; periodic eval and
checkpoints off) runs two
epochs; the second is timed, from the train-metrics write that ends the
first epoch to the one that ends the second (each write syncs on that
epoch's last step). B side: the same number of the same jitted step on
batches already on device, back to back, blocked once at the end.

Compiles are counted twice: during the timed loop runs (after warm-up; none
may happen), and by name over whole `train_and_evaluate` runs of one and of
three epochs with an eval each epoch (the counts must be equal: nothing
compiles per epoch; one train step and one eval step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import sys
import tempfile
from typing import Any


from benchmarks import common
from benchmarks import fixtures
from trainer import data as data_lib
from trainer import run as run_lib
from trainer import train

NAME = 'loop'
NEVER = 10 ** 9
# The loop's jitted train step (trainer.run.Run.train_step), as
# jax_log_compiles names it.
TRAIN_STEP = 'jit(train_and_merge)'
BATCHES = 4


class _EpochClock:
  """A metric writer that timestamps the train-metrics writes, then forwards."""

  def __init__(self, inner: Any) -> None:
    self.inner = inner
    self.train_writes: list[tuple[int, float]] = []

  def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
    if any(k.startswith('train_') for k in scalars):
      self.train_writes.append((step, common.now()))
    self.inner.write_scalars(step, scalars)

  def open(self) -> None:
    pass  # The inner writer exists.

  def flush(self) -> None:
    self.inner.flush()


def _with_setup(run: run_lib.Run, **changes: Any) -> run_lib.Run:
  """`run` with fields of its setup changed; the same jitted steps."""
  return dataclasses.replace(run,
                             setup=dataclasses.replace(run.setup, **changes))


def _with_schedule(run: run_lib.Run, **changes: Any) -> run_lib.Run:
  """`run` with fields of its loop schedule changed."""
  return _with_setup(
      run, schedule=dataclasses.replace(run.setup.schedule, **changes))


def _small(run: run_lib.Run, examples: int) -> run_lib.Run:
  train = run.setup.data.train
  train_split = data_lib.Split(train.images[:examples],
                               train.labels[:examples])
  return _with_setup(run, data=dataclasses.replace(run.setup.data,
                                                   train=train_split))


def _named_compiles(epochs: int, per_epoch: int) -> dict[str, int]:
  """Compiles by name over a whole train_and_evaluate of `epochs` epochs.

  Runs in this process; call it in a fresh one (see `main`), so that no
  earlier compile is cached in memory.
  """
  cfg = fixtures.config(**{
      'num_train_steps': epochs * per_epoch, 'eval_every_steps': per_epoch,
      'checkpoint_every_steps': NEVER, 'log_every_steps': per_epoch,
      'progress_bar': 'off'})
  with tempfile.TemporaryDirectory(prefix='bench-loop-') as workdir:
    with common.Compiles() as compiles:
      with contextlib.redirect_stdout(io.StringIO()):
        train.train_and_evaluate(cfg, workdir)
  return compiles.names


def _child_cache(size: common.Size) -> dict[str, str]:
  """The tiny size's child reads this process's persistent compilation cache.

  The tests turn JAX's cache on for their process: the child then reads the
  steps compiled here instead of compiling them again. Its counts do not
  change (jax_log_compiles logs every lowering, read from the cache or not);
  the full size, and a process without a cache, leave the child's alone.
  """
  import jax  # pylint: disable=g-import-not-at-top
  cache_dir = jax.config.jax_compilation_cache_dir
  if not size.tiny or not cache_dir:
    return {}
  return {'JAX_COMPILATION_CACHE_DIR': cache_dir}


def run(size: common.Size) -> dict[str, Any]:
  """Times the loop's epochs against pure steps; counts compiles."""
  cfg = fixtures.config(**{
      'eval_every_steps': NEVER, 'checkpoint_every_steps': NEVER,
      'progress_bar': 'on'})
  run = fixtures.trainer_run(cfg)
  batch_size = run.setup.schedule.batch_size
  if size.tiny:
    run = _small(run, 3 * batch_size)
  per_epoch = data_lib.steps_per_epoch(run.setup.data.train, batch_size)
  run = _with_schedule(run, log_every_steps=per_epoch)  # One sync and write an epoch.
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  logdir = tempfile.mkdtemp(prefix='bench-loop-')
  inner_writer = metric_writers.create_default_writer(logdir)
  loop_state = fixtures.trainer_state(run)
  start = {'step': 0}

  def save(*args: Any, **kwargs: Any) -> None:
    del args, kwargs  # Checkpoints are not part of this figure.

  epoch_windows: list[tuple[float, float]] = []

  def loop_unit() -> float:
    nonlocal loop_state
    clock = _EpochClock(inner_writer)
    first = start['step']
    epochs_run = _with_schedule(run,
                                num_train_steps=first + 2 * per_epoch)
    with open(os.devnull, 'w') as devnull:
      stderr, sys.stderr = sys.stderr, devnull  # The tqdm bar.
      try:
        loop_state, _ = train.train_loop(
            epochs_run, loop_state, first, clock, save)
      finally:
        sys.stderr = stderr
    start['step'] = first + 2 * per_epoch
    (s1, t1), (s2, t2) = clock.train_writes[:2]
    assert (s1, s2) == (first + per_epoch, first + 2 * per_epoch), (s1, s2)
    epoch_windows.append((t1, t2))
    return t2 - t1

  trainer_step = fixtures.TrainerStep(run)
  batches = fixtures.device_batches(run, BATCHES)

  def steps_unit() -> float:
    t = common.now()
    for i in range(per_epoch):
      trainer_step(batches[i % BATCHES])
    trainer_step.block()
    return common.now() - t

  loop_unit()  # Warm-up: compiles, imports.
  steps_unit()
  epoch_windows.clear()
  rounds = 1 if size.tiny else 8
  with common.Compiles() as timed_compiles:
    seconds = common.interleaved({'loop_epoch': loop_unit,
                                  'pure_steps': steps_unit}, rounds)
  in_epochs = [name for t1, t2 in epoch_windows
               for name in timed_compiles.between(t1, t2)]
  overhead = common.median(common.round_ratios(
      seconds['loop_epoch'], seconds['pure_steps'])) - 1
  compile_epochs = (1,) if size.tiny else (1, 3)
  named = {e: common.run_child(['-m', 'benchmarks.loop', str(e),
                                str(per_epoch)], **_child_cache(size))
           for e in compile_epochs}
  one, many = named[1], named[compile_epochs[-1]]
  per_run = {'train_step': one.get(TRAIN_STEP, 0),
             'eval_step': one.get('jit(eval_step)', 0)}
  inner_writer.close()
  shutil.rmtree(logdir, ignore_errors=True)
  cmd = common.command(NAME)
  return {
      'figures': [
          common.figure('epoch through the loop / sum of pure steps - 1',
                        overhead * 100, '%', '<= 5 %', overhead <= 0.05, cmd),
          common.figure('compiles during timed epochs (after warm-up)',
                        len(in_epochs), '', '0', not in_epochs, cmd),
          common.figure('train_step / eval_step compiles per run',
                        f"{per_run['train_step']} / {per_run['eval_step']}",
                        '', '1 / 1', per_run == {'train_step': 1,
                                                 'eval_step': 1}, cmd),
          common.figure(
              f'compiles, {compile_epochs[-1]}-epoch run minus 1-epoch run '
              '(eval every epoch)',
              sum(many.values()) - sum(one.values()), '', '0',
              many == one, cmd),
      ],
      'details': {
          'steps_per_epoch': per_epoch, 'rounds': rounds, 'seconds': seconds,
          'compiles_in_timed_loop_runs': timed_compiles.names,
          **{f'compiles_{e}_epoch_run': named[e] for e in compile_epochs},
      },
  }


if __name__ == '__main__':
  print(json.dumps(_named_compiles(int(sys.argv[1]), int(sys.argv[2]))))
