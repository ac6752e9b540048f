"""A run as one object: its setup, its state, its jitted steps, its batches.

`Run.prepare(config, workdir)` checks everything up front (`trainer.setup`;
nothing is written) and jits the pure steps of `trainer.steps`: this is the
one place a step is jitted. `train_and_evaluate` drives a `Run` through its
loop; the experiments and the benchmarks use the same object to start,
restore, step, evaluate and predict:

    run = Run.prepare(config, workdir)
    start = run.start()  # A fresh state through the hooks, or the resumed one.
    state, totals = start.state, run.empty_metrics()
    for batch in itertools.islice(run.train_batches(start.step), 10):
      state, totals = run.train_step(state, totals, batch)
    print(run.evaluate(state))  # {'accuracy': ..., 'loss': ...}
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Iterator

from absl import logging
import jax
import ml_collections
import numpy as np

import hooks
from trainer import checkpoint
from trainer import data as data_lib
from trainer import distributed
from trainer import setup as setup_lib
from trainer import steps
from trainer import surgery
from trainer.errors import CheckpointError

TrainState = setup_lib.TrainState


def enable_compilation_cache(path: str) -> None:
  """Turns on JAX's persistent compilation cache in `path`, for every compile.

  The thresholds are lowered to zero: the CNN's steps compile in about a
  second on a CPU, below JAX's default minimum for caching.
  """
  jax.config.update('jax_compilation_cache_dir', os.path.expanduser(path))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  logging.info('Persistent compilation cache in %s.', path)


@dataclasses.dataclass(frozen=True)
class Start:
  """The state a run starts from, and what made it.

  Attributes:
    state: the TrainState at `step`, with the optimizer of its freeze phase.
    step: the step the state is at.
    record: the hooks and checkpoints that made the state; every checkpoint's
      `meta` item holds it.
    report: the surgery report of a fresh start; None when the run resumes
      its own checkpoint (no hook runs again).
  """
  state: TrainState
  step: int
  record: dict[str, Any]
  report: hooks.Report | None

  @property
  def resumed(self) -> bool:
    """Whether the state is the run's own checkpoint."""
    return self.report is None


@dataclasses.dataclass(frozen=True)
class Run:
  """A checked run and its steps, each jitted once.

  Attributes:
    setup: what `trainer.setup.prepare` derived from the config.
    train_step: `(state, totals, batch) -> (state, totals)`:
      `steps.train_and_merge`, state and totals donated, checking for
      non-finite values as config.stop_on_nonfinite says; each leaf of the
      new state keeps the sharding config.partition_rules give it.
    empty_metrics: `() -> totals`: empty `steps.TrainMetrics`, on the
      devices, for `train_step` to start from.
    eval_step: `(state, batch) -> steps.EvalMetrics` of a padded batch.
    predict_step: `(state, images) -> labels` of one batch.
  """
  setup: setup_lib.Setup
  train_step: Callable[..., tuple[TrainState, steps.TrainMetrics]]
  empty_metrics: Callable[[], steps.TrainMetrics]
  eval_step: Callable[[TrainState, steps.Batch], steps.EvalMetrics]
  predict_step: Callable[[TrainState, jax.Array], jax.Array]

  @classmethod
  def prepare(cls, config: ml_collections.ConfigDict, workdir: str, *,
              load_data: bool = True) -> Run:
    """Checks the config, the workdir, a stored checkpoint and the data.

    Writes nothing and compiles nothing; turns on the persistent
    compilation cache when the config names one. Bad config, data and
    checkpoint input fails here; hook entries and donors fail in `start`,
    before anything is written.

    Args:
      config: the run config.
      workdir: the run's workdir.
      load_data: load the data (a run without it can build, restore and
        step states, but has no batches).

    Returns:
      The run.

    Raises:
      TrainerError: a bad config, workdir, data source, hook or checkpoint.
    """
    setup = setup_lib.prepare(config, workdir, load_data=load_data)
    if setup.compilation_cache_dir:
      enable_compilation_cache(setup.compilation_cache_dir)
    replicated = setup.topology.replicated
    options = setup.compilation.compiler_options  # trainer.xla: config.xla.
    return cls(
        setup=setup,
        train_step=jax.jit(
            functools.partial(steps.train_and_merge,
                              check_finite=setup.schedule.stop_on_nonfinite,
                              constrain=setup.topology.constrain),
            donate_argnums=(0, 1), compiler_options=options),
        empty_metrics=jax.jit(steps.TrainMetrics.empty,
                              out_shardings=replicated,
                              compiler_options=options),
        eval_step=jax.jit(steps.eval_step, out_shardings=replicated,
                          compiler_options=options),
        predict_step=jax.jit(steps.predict, out_shardings=replicated,
                             compiler_options=options))

  # States.

  def abstract_state(self, step: int = 0) -> TrainState:
    """The state's shapes, dtypes and shardings at `step`; no memory."""
    return setup_lib.abstract_state(self.setup, step)

  def fresh_state(self) -> TrainState:
    """The seed's freshly initialised state (no hooks), on the devices."""
    return setup_lib.initial_state(self.setup)

  def enter_phase(self, state: TrainState, step: int) -> TrainState:
    """`state` with the optimizer of `step`'s freeze phase (slots carried)."""
    return setup_lib.enter_phase(self.setup, state, step)

  def restore(self, step: int | None = None) -> TrainState:
    """A checkpoint of the run's own workdir, in its step's freeze phase.

    Args:
      step: the checkpoint step; default the one a run resumes
        (config.resume_step, or the latest).

    Returns:
      The state, every array read and placed on the devices.

    Raises:
      CheckpointError: no such step, or it does not fit this run's state,
        or it cannot be read back.
    """
    ckpt_dir = checkpoint.directory(self.setup.workdir)
    step = self.setup.latest_step if step is None else step
    if step is None:
      raise CheckpointError(f'{ckpt_dir} holds no checkpoint to restore; '
                            'train the run first, or use start().')
    if step != self.setup.latest_step:
      found = checkpoint.steps(self.setup.workdir)
      if step not in found:
        raise CheckpointError(f'{ckpt_dir} has no checkpoint step {step} (it '
                              f'has {found or "none"}); restore one of them.')
    return checkpoint.restore(self.abstract_state(step), ckpt_dir, step)

  def start(self) -> Start:
    """The state the run starts from; writes nothing.

    A fresh workdir starts through `trainer.surgery`: config.init_from and
    the pre_restore hooks, or a fresh state and the post_init hooks. A
    workdir with a checkpoint resumes it (every array is read, so a damaged
    step fails here) and runs no hook.

    Returns:
      The starting state, its step, its surgery record and report.

    Raises:
      CheckpointError, ConfigError, SurgeryError: a hook, a donor or the
        checkpoint failed.
    """
    setup = self.setup
    if setup.latest_step is None:
      state, record, report = surgery.start(setup)
      step = int(state.step)
      return Start(self.enter_phase(state, step), step, record, report)
    step = setup.latest_step
    ckpt_dir = checkpoint.directory(setup.workdir)
    state = self.restore(step)
    record = checkpoint.read_json(ckpt_dir, step, 'meta')['surgery']
    logging.info('Resuming from %s at step %d; hooks are not run again.',
                 ckpt_dir, step)
    return Start(state, step, record, None)

  # Batches, evaluation and prediction.

  def _data(self) -> data_lib.Data:
    if self.setup.data is None:
      raise ValueError('this Run was prepared with load_data=False and has '
                       'no data; prepare it with load_data=True.')
    return self.setup.data

  def train_batches(self, start_step: int = 0) -> Iterator[steps.Batch]:
    """The run's train batches from `start_step` on, on the devices.

    Batch s is the one the loop trains step s + 1 on, placed as the loop
    places it (each process puts its rows of the global batch).

    Args:
      start_step: the step of the first batch.

    Yields:
      {'image', 'label'}: global batches, sharded over the `data` axis.
    """
    setup = self.setup
    for batch in data_lib.train_batches(
        self._data().train, setup.schedule.batch_size, setup.seed,
        start_step):
      yield distributed.shard_batch(batch, setup.topology.batch)

  def evaluate(self, state: TrainState) -> dict[str, float]:
    """Loss and accuracy over the test split (the padded last batch masked)."""
    total = None
    for batch in data_lib.eval_batches(self._data().test,
                                       self.setup.schedule.eval_batch_size):
      metrics = self.eval_step(
          state, distributed.shard_batch(batch, self.setup.topology.batch))
      total = metrics if total is None else total.merge(metrics)
    return {k: float(v) for k, v in jax.device_get(total.compute()).items()}

  def predict(self, state: TrainState, images: np.ndarray,
              batch_size: int | None = None) -> np.ndarray:
    """The predicted class (0..k-1) of each image.

    Args:
      state: the state to predict with.
      images: [N, 28, 28, 1] float32 in [0, 1].
      batch_size: images per call (the last batch padded); a multiple of
        the device count. Default config.eval_batch_size.

    Returns:
      [N] int labels, on the host.
    """
    batch_size = batch_size or self.setup.schedule.eval_batch_size
    split = data_lib.Split(images, np.zeros(len(images), np.int32))
    predicted, masks = [], []
    for batch in data_lib.eval_batches(split, batch_size):
      placed = distributed.shard_batch({'image': batch['image']},
                                       self.setup.topology.batch)
      predicted.append(self.predict_step(state, placed['image']))
      masks.append(batch['mask'])
    # One transfer at the end: the device runs ahead of the host.
    return np.concatenate([np.asarray(p)[m] for p, m in
                           zip(jax.device_get(predicted), masks)])
