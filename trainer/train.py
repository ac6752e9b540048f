"""Wires data, model, optimizer, steps and checkpoints into a training run."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
from typing import Any, Iterator

from absl import logging
import flax
from flax.training import train_state
import jax
import ml_collections
import numpy as np
import optax

from trainer import checkpoint
from trainer import data as data_lib
from trainer import distributed
from trainer import host
from trainer import resume
from trainer import setup as setup_lib
from trainer import steps
from trainer import surgery
from trainer import workdir as workdir_lib

TrainState = train_state.TrainState


def _meta(setup: setup_lib.Setup,
          surgery_record: dict[str, Any]) -> dict[str, Any]:
  return {'classes': list(setup.config.classes),
          'data_source': setup.data.source,
          'model': setup.config.model.name,
          'surgery': surgery_record}


def evaluate(eval_fn: Any, state: TrainState, split: data_lib.Split,
             batch_size: int, topology: distributed.Topology
             ) -> dict[str, float]:
  """Loss and accuracy over the whole split (padded last batch masked)."""
  total = None
  for batch in data_lib.eval_batches(split, batch_size):
    batch_metrics = eval_fn(state, distributed.shard_batch(batch,
                                                           topology.batch))
    total = batch_metrics if total is None else total.merge(batch_metrics)
  return {k: float(v) for k, v in jax.device_get(total.compute()).items()}


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


def _versions() -> dict[str, str]:
  return {'jax': jax.__version__, 'jaxlib': jax.lib.__version__,
          'flax': flax.__version__, 'optax': optax.__version__}


def enable_compilation_cache(path: str) -> None:
  """Turns on JAX's persistent compilation cache in `path`, for every compile.

  The thresholds are lowered to zero: the CNN's steps compile in about a
  second on a CPU, below JAX's default minimum for caching.
  """
  jax.config.update('jax_compilation_cache_dir', os.path.expanduser(path))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  logging.info('Persistent compilation cache in %s.', path)


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


def _train_and_merge(state: TrainState, totals: steps.TrainMetrics,
                     batch: steps.Batch
                     ) -> tuple[TrainState, steps.TrainMetrics]:
  state, metrics = steps.train_step(state, batch)
  return state, totals.merge(metrics)


def train_functions(topology: distributed.Topology) -> tuple[Any, Any]:
  """The loop's train step and the empty metric totals it starts from.

  The step is `steps.train_step` with its metrics added to running totals in
  the same program, state and totals donated: per-step metric outputs and a
  merge dispatch per step cost about 1 ms a step on a CPU (10% of a step
  with frozen convolutions; benchmarks/freeze.py).

  Args:
    topology: the run's devices.

  Returns:
    (train_fn, empty_metrics): `train_fn(state, totals, batch) -> (state,
    totals)` and `empty_metrics() -> totals`, both jitted.
  """
  train_fn = jax.jit(_train_and_merge, donate_argnums=(0, 1),
                     out_shardings=topology.replicated)
  empty_metrics = jax.jit(steps.TrainMetrics.empty,
                          out_shardings=topology.replicated)
  return train_fn, empty_metrics


def _progress_report(setup: setup_lib.Setup, writer: Any) -> Any:
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  writer.open()
  return periodic_actions.ReportProgress(
      num_train_steps=setup.num_train_steps, writer=writer)


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains and evaluates as `config` says; resumes a checkpoint in `workdir`.

  Args:
    config: the run config.
    workdir: where checkpoints, TensorBoard events and summary.json go.

  Returns:
    The summary that is also written to `workdir/summary.json`.
  """
  workdir = os.path.abspath(os.path.expanduser(workdir)) if workdir else workdir
  setup = setup_lib.prepare(config, workdir)
  if config.compilation_cache_dir:
    enable_compilation_cache(config.compilation_cache_dir)
  if setup.latest_step is None:
    state, record, report = surgery.start(setup)
    start_step = int(state.step)
    state = setup_lib.enter_phase(setup, state, start_step)
  else:
    start_step = setup.latest_step
    ckpt_dir = checkpoint.directory(workdir)
    state = checkpoint.restore(setup_lib.abstract_state(setup, start_step),
                               ckpt_dir, start_step)
    record = checkpoint.read_json(ckpt_dir, start_step, 'meta')['surgery']
    report = None
    logging.info('Resuming from %s at step %d; hooks are not run again.',
                 ckpt_dir, start_step)
  writer = _MetricWriter(workdir)
  manager = checkpoint.writer(workdir, config.keep_checkpoints)
  save = functools.partial(checkpoint.save, manager,
                           config=resume.to_json_dict(config),
                           meta=_meta(setup, record))
  if setup.latest_step is None:
    if report is not None and jax.process_index() == 0:
      surgery.write_report(workdir, report)
    save(start_step, state)
  state, stats = _train_loop(setup, state, start_step, writer, save)
  summary = {
      'data_source': setup.data.source,
      'train_size': setup.data.train.size, 'test_size': setup.data.test.size,
      'classes': list(config.classes), 'steps': stats['step'],
      'steps_this_run': stats['steps_run'],
      'final_eval_loss': stats['eval']['loss'],
      'final_eval_accuracy': stats['eval']['accuracy'],
      'train_examples_per_sec': stats['examples_per_sec'],
      'preempted': stats['preempted'],
      'versions': _versions(),
      'cpu': host.cpu_model(),
      'device_kind': jax.devices()[0].device_kind,
      'device_count': jax.device_count(),
      'process_count': jax.process_count(),
  }
  if jax.process_index() == 0:
    workdir_lib.write_json(os.path.join(workdir, 'summary.json'), summary)
  writer.flush()
  manager.close()
  return summary


def _train_loop(setup: setup_lib.Setup, state: TrainState, start_step: int,
                writer: Any, save: Any) -> tuple[TrainState, dict[str, Any]]:
  """Runs steps start_step..num_train_steps; evaluates and saves on schedule.

  The progress report and the metric writer (TensorFlow) are created after
  the first step, so that nothing but the run's own work precedes it.
  """
  config, topology = setup.config, setup.topology
  train_fn, empty_metrics = train_functions(topology)
  eval_fn = jax.jit(steps.eval_step, out_shardings=topology.replicated)
  batches: Iterator[dict[str, np.ndarray]] = data_lib.train_batches(
      setup.data.train, config.batch_size, config.seed, start_step)
  report = None  # Created after the first step.
  bar = _progress_bar(config.progress_bar, setup.num_train_steps, start_step)
  run_eval = functools.partial(evaluate, eval_fn, split=setup.data.test,
                               batch_size=config.eval_batch_size,
                               topology=topology)
  train_metrics, eval_metrics, eval_step = empty_metrics(), None, None
  step, paused, t_start, preempted = start_step, 0.0, None, False
  with Preemption() as preemption:
    while step < setup.num_train_steps and not preempted:
      if step in setup.freeze.boundaries:
        state = setup_lib.enter_phase(setup, state, step)
      batch = distributed.shard_batch(next(batches), topology.batch)
      state, train_metrics = train_fn(state, train_metrics, batch)
      step += 1
      if t_start is None:  # Time the steady state, not the first compile.
        jax.block_until_ready(state)
        logging.info('First step of this run done (step %d, compile '
                     'included).', step)
        report = _progress_report(setup, writer)
        t_start = time.perf_counter()
      report(step)
      if bar is not None:
        bar.update(1)
      t_pause = time.perf_counter()
      if step % config.log_every_steps == 0 or step == setup.num_train_steps:
        writer.write_scalars(step, {
            f'train_{k}': float(v)
            for k, v in jax.device_get(train_metrics.compute()).items()})
        train_metrics = empty_metrics()
      if step % config.eval_every_steps == 0 or step == setup.num_train_steps:
        with report.timed('eval'):
          eval_metrics, eval_step = run_eval(state), step
        writer.write_scalars(step, {f'eval_{k}': v
                                    for k, v in eval_metrics.items()})
        logging.info('step %d: eval accuracy %.4f, loss %.4f', step,
                     eval_metrics['accuracy'], eval_metrics['loss'])
      preempted = preemption.requested(step)
      if (step % config.checkpoint_every_steps == 0 or preempted
          or step == setup.num_train_steps):
        with report.timed('checkpoint'):
          save(step, state, metrics=(
              {'accuracy': eval_metrics['accuracy']}
              if eval_step == step else None))
      paused += time.perf_counter() - t_pause
  if bar is not None:
    bar.close()
  jax.block_until_ready(state)
  steps_run = step - start_step
  examples_per_sec = None
  if steps_run > 1:
    elapsed = time.perf_counter() - t_start - paused
    examples_per_sec = (steps_run - 1) * config.batch_size / max(elapsed, 1e-9)
  if eval_step != step:
    eval_metrics = run_eval(state)
  return state, {'step': step, 'steps_run': steps_run, 'eval': eval_metrics,
                 'examples_per_sec': examples_per_sec, 'preempted': preempted}
