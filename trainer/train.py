"""The training loop: a `trainer.run.Run` trained, evaluated and saved."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
from typing import Any

from absl import logging
from flax.training import train_state
import jax
import ml_collections

import hooks
from trainer import checkpoint
from trainer import host
from trainer import run as run_lib
from trainer import setup as setup_lib
from trainer import steps
from trainer import surgery
from trainer import workdir as workdir_lib
from trainer.errors import NonFiniteError

TrainState = train_state.TrainState


def _meta(setup: setup_lib.Setup,
          surgery_record: dict[str, Any]) -> dict[str, Any]:
  return {'classes': list(setup.classes),
          'data_source': setup.data.source,
          'model': setup.model_name,
          'surgery': surgery_record,
          'xla': setup.compilation.record()}


class Preemption(contextlib.AbstractContextManager):
  """Turns SIGTERM into a request to checkpoint and stop after this step."""

  def __init__(self):
    self._requested = threading.Event()
    self._previous = None

  def __enter__(self) -> 'Preemption':
    # Several processes: JAX's preemption service handles SIGTERM itself.
    if (jax.process_count() == 1
        and threading.current_thread() is threading.main_thread()):
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum: int, frame: Any) -> None:
    del signum, frame
    logging.warning('SIGTERM: saving a checkpoint after this step, then '
                    'stopping.')
    self._requested.set()

  def requested(self, step: int) -> bool:
    """Whether to stop after `step`; every process agrees on the answer.

    With several processes, a SIGTERM reaches them at different steps; JAX's
    preemption sync point (set up by jax.distributed) picks one step for all.

    Args:
      step: the step just finished.
    """
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested.is_set()

  def __exit__(self, *exc: Any) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _progress_bar(setting: str, total: int, initial: int) -> Any:
  if setting == 'off' or (setting == 'auto' and not sys.stdout.isatty()):
    return None
  import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True)


class _MetricWriter:
  """clu's default metric writer (TensorBoard events), created when opened.

  clu's writers and progress report import TensorFlow, which takes seconds:
  the loop opens the writer after the first step, off the path to it.
  """

  def __init__(self, workdir: str):
    self._workdir = workdir
    self._writer = None

  def open(self) -> None:
    """Creates the writer (imports TensorFlow) unless it exists."""
    if self._writer is None:
      from clu import metric_writers  # pylint: disable=g-import-not-at-top
      self._writer = metric_writers.create_default_writer(
          self._workdir, just_logging=jax.process_index() > 0)

  def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
    self.open()
    self._writer.write_scalars(step, scalars)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()


class Guard:
  """Stops the run at a non-finite loss, gradient norm or state.

  The train step records the first step with a NaN or infinite loss or
  gradient norm in the metric totals (`steps.FirstNonFinite`, on device);
  `check_totals` reads it only where the loop reads metrics anyway (log,
  eval and checkpoint steps). `check_state` looks at every leaf of the state
  before a checkpoint is written (an update can overflow from finite
  gradients), so no checkpoint ever holds a non-finite value.
  """

  def __init__(self, schedule: setup_lib.Schedule, last_saved: int | None):
    self.enabled = schedule.stop_on_nonfinite
    self.last_saved = last_saved
    self._learning_rate = schedule.learning_rate
    self._finite_leaves = jax.jit(steps.finite_leaves)

  def _stop(self, step: int, what: str) -> NonFiniteError:
    return NonFiniteError(
        f'training stopped at step {step}: {what}. Usual causes: a learning '
        'rate too high (config.optimizer.learning_rate='
        f'{self._learning_rate}), bad input data (NaN or inf in a batch), '
        'overflow in low precision (float16/bfloat16), or a checkpoint '
        f'(init_from) that holds such values. {self._kept()} '
        '--config.stop_on_nonfinite=False trains on regardless.')

  def _kept(self) -> str:
    if self.last_saved is None:
      return 'No checkpoint was written.'
    return (f'No checkpoint after step {self.last_saved} was written; it '
            'stays the latest, which the same command resumes from (the '
            'learning rate may change on resume). If the loss was already '
            'diverging by then, start afresh: another --workdir with a lower '
            '--config.optimizer.learning_rate.')

  def check_totals(self, first_nonfinite: Any, step: int) -> None:
    """Raises NonFiniteError if any step so far was not finite."""
    first = int(jax.device_get(first_nonfinite))
    if self.enabled and first != steps.ALL_FINITE:
      raise self._stop(step, f'the loss or the gradient norm of step {first} '
                       'is NaN or infinite')

  def check_state(self, state: TrainState, step: int) -> None:
    """Raises NonFiniteError if the state holds a NaN or an infinity."""
    if not self.enabled:
      return
    finite = hooks.flatten(jax.device_get(self._finite_leaves(
        {'params': state.params, 'opt_state': state.opt_state})))
    bad = [key for key, ok in finite.items() if not ok]
    if bad:
      shown = ', '.join(bad[:5]) + (', ...' if len(bad) > 5 else '')
      raise self._stop(step, 'the state holds NaN or infinite values in '
                       f'{len(bad)} of its {len(finite)} arrays: {shown}')


def _progress_report(num_train_steps: int, writer: Any) -> Any:
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  writer.open()
  return periodic_actions.ReportProgress(num_train_steps=num_train_steps,
                                         writer=writer)


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains and evaluates as `config` says; resumes a checkpoint in `workdir`.

  Args:
    config: the run config.
    workdir: where checkpoints, TensorBoard events and summary.json go.

  Returns:
    The summary that is also written to `workdir/summary.json`.
  """
  run = run_lib.Run.prepare(config, workdir)
  setup = run.setup
  start = run.start()
  if start.resumed and setup.resume_step is not None:
    checkpoint.set_aside(setup.workdir, after=start.step)
  writer = _MetricWriter(setup.workdir)
  manager = checkpoint.writer(setup.workdir, setup.schedule.keep_checkpoints)
  try:
    save = functools.partial(checkpoint.save, manager,
                             config=setup.stored_config,
                             meta=_meta(setup, start.record))
    guard = Guard(setup.schedule, last_saved=setup.latest_step)
    state = start.state
    if not start.resumed:
      if jax.process_index() == 0:
        surgery.write_report(setup.workdir, start.report)
      guard.check_state(state, start.step)
      save(start.step, state)
      guard.last_saved = start.step
    state, stats = train_loop(run, state, start.step, writer, save, guard)
  finally:  # Also when the run stops on an error: no open files at exit.
    writer.flush()
    manager.close()
  summary = {
      'data_source': setup.data.source,
      'train_size': setup.data.train.size, 'test_size': setup.data.test.size,
      'classes': list(setup.classes), 'steps': stats['step'],
      'steps_this_run': stats['steps_run'],
      'final_eval_loss': stats['eval']['loss'],
      'final_eval_accuracy': stats['eval']['accuracy'],
      'train_examples_per_sec': stats['examples_per_sec'],
      'preempted': stats['preempted'],
      'xla': setup.compilation.record(),
      **host.environment(),
  }
  if jax.process_index() == 0:
    workdir_lib.write_json(os.path.join(setup.workdir, 'summary.json'),
                           summary)
  return summary


def train_loop(run: run_lib.Run, state: TrainState, start_step: int,
               writer: Any, save: Any, guard: Guard | None = None
               ) -> tuple[TrainState, dict[str, Any]]:
  """Runs steps start_step..num_train_steps; evaluates and saves on schedule.

  The progress report and the metric writer (TensorFlow) are created after
  the first step, so that nothing but the run's own work precedes it.

  Args:
    run: the prepared run; its schedule says when to log, evaluate and save.
    state: the state at `start_step`.
    start_step: the step the loop starts from.
    writer: a clu metric writer.
    save: `save(step, state, metrics=...)`, called at checkpoint steps.
    guard: stops the run at a NaN or inf; default the schedule's.

  Returns:
    The final state and the loop's figures (step, steps_run, eval,
    examples_per_sec, preempted).

  Raises:
    NonFiniteError: the guard found a non-finite loss, gradient or state.
  """
  schedule = run.setup.schedule
  guard = guard or Guard(schedule, last_saved=start_step)
  batches = run.train_batches(start_step)
  report = None  # Created after the first step.
  bar = _progress_bar(schedule.progress_bar, schedule.num_train_steps,
                      start_step)
  train_metrics, eval_metrics, eval_step = run.empty_metrics(), None, None
  step, paused, t_start, preempted = start_step, 0.0, None, False
  with Preemption() as preemption:
    while step < schedule.num_train_steps and not preempted:
      if step in run.setup.freeze.boundaries:
        state = run.enter_phase(state, step)
      state, train_metrics = run.train_step(state, train_metrics,
                                            next(batches))
      step += 1
      if t_start is None:  # Time the steady state, not the first compile.
        jax.block_until_ready(state)
        logging.info('First step of this run done (step %d, compile '
                     'included).', step)
        report = _progress_report(schedule.num_train_steps, writer)
        t_start = time.perf_counter()
      report(step)
      if bar is not None:
        bar.update(1)
      last = step == schedule.num_train_steps
      if last or any(step % every == 0 for every in (
          schedule.log_every_steps, schedule.eval_every_steps,
          schedule.checkpoint_every_steps)):
        # The steps still queued are training time: wait for them before the
        # pause (metrics, eval, checkpoint) starts, not inside it.
        jax.block_until_ready((state, train_metrics))
      t_pause = time.perf_counter()
      preempted = preemption.requested(step)
      checkpoint_now = (step % schedule.checkpoint_every_steps == 0
                        or preempted or last)
      eval_now = step % schedule.eval_every_steps == 0 or last
      if step % schedule.log_every_steps == 0 or last:
        scalars = jax.device_get(train_metrics.compute())
        first_nonfinite = scalars.pop('first_nonfinite_step')
        writer.write_scalars(step, {f'train_{k}': float(v)
                                    for k, v in scalars.items()})
        train_metrics = run.empty_metrics()
        guard.check_totals(first_nonfinite, step)
      elif guard.enabled and (eval_now or checkpoint_now):
        guard.check_totals(train_metrics.first_nonfinite_step.compute(), step)
      if eval_now:
        with report.timed('eval'):
          eval_metrics, eval_step = run.evaluate(state), step
        writer.write_scalars(step, {f'eval_{k}': v
                                    for k, v in eval_metrics.items()})
        logging.info('step %d: eval accuracy %.4f, loss %.4f', step,
                     eval_metrics['accuracy'], eval_metrics['loss'])
      if checkpoint_now:
        guard.check_state(state, step)
        with report.timed('checkpoint'):
          save(step, state, metrics=(
              {'accuracy': eval_metrics['accuracy']}
              if eval_step == step else None))
        guard.last_saved = step
      paused += time.perf_counter() - t_pause
  if bar is not None:
    bar.close()
  jax.block_until_ready(state)
  steps_run = step - start_step
  examples_per_sec = None
  if steps_run > 1:
    elapsed = time.perf_counter() - t_start - paused
    examples_per_sec = ((steps_run - 1) * schedule.batch_size
                        / max(elapsed, 1e-9))
  if eval_step != step:
    eval_metrics = run.evaluate(state)
  return state, {'step': step, 'steps_run': steps_run, 'eval': eval_metrics,
                 'examples_per_sec': examples_per_sec, 'preempted': preempted}
