"""Everything a run needs before its first step, checked up front.

`prepare` validates the config, the workdir, a stored checkpoint, the hook
phases and the freeze schedule, and loads the data (the hooks themselves are
built once, by `surgery.prepare`, before anything is written); it writes
nothing, so every bad input fails here. It is the one reader of the config:
the `Setup` it returns holds the values later stages need (surgery, the loop
through `trainer.run.Run`, and the resolved config that every checkpoint
stores), not the config. The state helpers build the TrainState of a run for
the freeze phase of a given step, concretely or abstractly (no memory).

A run's state is a flax `TrainState` whichever API the model is written in
(config.model.api): `step` (int32), `params` (nested dicts under the Linen
names) and `opt_state`, with the model's `apply` (`models.Model`) as
`apply_fn`. For an NNX model `apply_fn` merges the model's graph with the
params inside the jitted step (`models.NnxApply`). So the flat keys, the
checkpoints, the freeze schedule and the hooks are the same for both APIs,
and an NNX run's checkpoint is a donor for a Linen run and the other way
round. The keys are those `hooks.nnx_state.flatten((model, optimizer))`
gives for `nnx.Optimizer(model, tx, wrt=nnx.Param)`. Two choices differ
from an `nnx.Optimizer`: the step stays int32 (an `nnx.Optimizer`'s is
uint32), one dtype for both APIs, so either run's checkpoint restores into
the other's state as it is (hooks that copy a step into an `nnx.Optimizer`
carry its value); and config.freeze freezes through the optimizer
(`hooks.freeze`'s partition) for both APIs, so a frozen run's slots are
those of `nnx.Optimizer(wrt=hooks.nnx_freeze.freeze_filter(...))` one level
down (`opt_state/inner_states/trainable/inner_state/...`), as in a Linen
run; hooks match slots by param path either way.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

from absl import logging
from flax.training import train_state
import jax
import ml_collections
import optax

import hooks
from trainer import checkpoint
from trainer import data as data_lib
from trainer import distributed
from trainer import models
from trainer import optimizers
from trainer import resume
from trainer import validation
from trainer import workdir as workdir_lib
from trainer import xla
from trainer.errors import CheckpointError
from trainer.errors import ConfigError

TrainState = train_state.TrainState
HOOK_PHASES = ('post_init', 'pre_restore')


@dataclasses.dataclass(frozen=True)
class Schedule:
  """What the training loop reads of the config: length, batches, periods.

  Attributes:
    num_train_steps: the step the run ends at.
    batch_size: the global train batch.
    eval_batch_size: the global eval batch.
    log_every_steps: how often train metrics are written.
    eval_every_steps: how often the test split is evaluated.
    checkpoint_every_steps: how often a checkpoint is written.
    keep_checkpoints: the latest checkpoints kept (the best one besides).
    progress_bar: 'auto', 'on' or 'off'.
    stop_on_nonfinite: stop at a NaN or infinite loss, gradient or state.
    learning_rate: the optimizer's, named by the guard's message.
  """
  num_train_steps: int
  batch_size: int
  eval_batch_size: int
  log_every_steps: int
  eval_every_steps: int
  checkpoint_every_steps: int
  keep_checkpoints: int
  progress_bar: str
  stop_on_nonfinite: bool
  learning_rate: float


@dataclasses.dataclass(frozen=True)
class Setup:
  """A checked run: the values derived from its config, devices, data, model.

  Attributes:
    workdir: the run's workdir, absolute.
    stored_config: the resolved config as JSON data, as checkpoints store it.
    seed: the fresh init's and the train batches' seed.
    classes: the digit of each class (head column), in order.
    model_name: the model's name in `models.MODELS`.
    init_from: the checkpoint a fresh start restores ('' for a fresh init).
    hook_lists: phase -> the config's hook entries, as plain dicts.
    schedule: what the loop reads.
    topology: the run's mesh, and where each leaf of the state lives
      (config.mesh, config.partition_rules).
    data: the splits (None when prepared without data).
    model: pure init and apply, for either Flax API.
    tx: the optimizer before freezing.
    freeze: the freeze schedule.
    latest_step: the step to resume (config.resume_step or the latest).
    resume_step: config.resume_step: the step asked for (None: the latest).
    compilation_cache_dir: JAX's persistent compilation cache ('' = off).
    compilation: the compiler options of every jitted step (config.xla).
  """
  workdir: str
  stored_config: dict[str, Any]
  seed: int
  classes: tuple[int, ...]
  model_name: str
  init_from: str
  hook_lists: dict[str, list[dict[str, Any]]]
  schedule: Schedule
  topology: distributed.Topology
  data: data_lib.Data | None
  model: models.Model
  tx: optax.GradientTransformation
  freeze: hooks.FreezeSchedule
  latest_step: int | None
  resume_step: int | None
  compilation_cache_dir: str
  compilation: xla.Compilation

  @property
  def head(self) -> str:
    """The model's classifier layer, whose columns surgery maps by digit."""
    return models.HEADS[self.model_name]

  @functools.cached_property
  def abstract_params(self) -> Any:
    return jax.eval_shape(self.model.init, jax.random.key(self.seed))

  @functools.cached_property
  def _phase_txs(self) -> dict[int, optax.GradientTransformation]:
    # One object per phase: the jitted step retraces only when it changes.
    txs = {-1: self.tx}
    for index, (start, _) in enumerate(self.freeze.phases):
      txs[index] = self.freeze.tx_at(start, self.tx, self.abstract_params)
    return txs

  def tx_at(self, step: int) -> optax.GradientTransformation:
    """The optimizer of the freeze phase that `step` is in."""
    return self._phase_txs[self.freeze.phase_index(step)]


def schedule(config: ml_collections.ConfigDict, train_size: int) -> Schedule:
  """The loop's schedule from the config, for a train split of `train_size`."""
  return Schedule(
      num_train_steps=num_train_steps(config, train_size),
      batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
      log_every_steps=config.log_every_steps,
      eval_every_steps=config.eval_every_steps,
      checkpoint_every_steps=config.checkpoint_every_steps,
      keep_checkpoints=config.keep_checkpoints,
      progress_bar=config.progress_bar,
      stop_on_nonfinite=config.stop_on_nonfinite,
      learning_rate=config.optimizer.learning_rate)


def num_train_steps(config: ml_collections.ConfigDict, train_size: int) -> int:
  """config.num_train_steps, or num_epochs full epochs of the train split."""
  if config.num_train_steps is not None:
    return config.num_train_steps
  return config.num_epochs * max(1, train_size // config.batch_size)


def hook_entries(config: ml_collections.ConfigDict,
                 phase: str) -> list[dict[str, Any]]:
  """The config's hook list for `phase` as plain dicts."""
  return [dict(entry.to_dict()) if hasattr(entry, 'to_dict') else dict(entry)
          for entry in config.hooks[phase]]


def _check_hooks(config: ml_collections.ConfigDict) -> None:
  unknown_phases = sorted(set(config.hooks.keys()) - set(HOOK_PHASES))
  if unknown_phases:
    raise ConfigError(f'config.hooks has unknown phases {unknown_phases}; '
                      f'use {list(HOOK_PHASES)}.')
  if config.hooks.pre_restore and not config.init_from:
    raise ConfigError('config.hooks.pre_restore runs on the checkpoint named '
                      'by config.init_from, which is empty; set '
                      '--config.init_from or move the hooks to post_init.')
  if config.hooks.post_init and config.init_from:
    names = [entry.get('name') for entry in hook_entries(config, 'post_init')]
    raise ConfigError(
        'config.hooks.post_init runs on a freshly initialised state, but '
        'config.init_from makes the state from a checkpoint, so these hooks '
        f'would never run: {names}. '
        'Move them to config.hooks.pre_restore (they then run on the '
        'checkpoint before it is restored), or clear config.init_from.')
  for phase in HOOK_PHASES:
    for index, entry in enumerate(hook_entries(config, phase)):
      if not entry.get('name'):
        raise ConfigError(f'config.hooks.{phase}[{index}]={entry!r} has no '
                          "'name'; write e.g. {'name': 'warm_start', ...}.")


def freeze_schedule(config: ml_collections.ConfigDict) -> hooks.FreezeSchedule:
  """The freeze schedule from config.freeze.patterns and unfreeze_steps.

  Args:
    config: the run config.

  Returns:
    Pattern i is frozen from step 0 until unfreeze_steps[i] (for ever when
    unfreeze_steps is empty).

  Raises:
    ConfigError: unfreeze_steps does not give one positive step per pattern.
  """
  patterns = tuple(config.freeze.patterns)
  steps = tuple(config.freeze.unfreeze_steps)
  if not patterns:
    if steps:
      raise ConfigError(f'config.freeze.unfreeze_steps={steps} needs '
                        'config.freeze.patterns to unfreeze.')
    return hooks.FreezeSchedule()
  if steps and (len(steps) != len(patterns)
                or not all(isinstance(s, int) and s > 0 for s in steps)):
    raise ConfigError(
        f'config.freeze.unfreeze_steps={steps} must give one step > 0 for '
        f'each of the {len(patterns)} patterns {patterns}, or be empty.')
  phases = {0: list(patterns)}
  for boundary in sorted(set(steps)):
    phases[boundary] = [p for p, s in zip(patterns, steps) if s > boundary]
  try:
    return hooks.FreezeSchedule.parse(phases)
  except ValueError as e:
    raise ConfigError(f'config.freeze: {e}') from e


def prepare(config: ml_collections.ConfigDict, workdir: str, *,
            load_data: bool = True) -> Setup:
  """Checks the config, the workdir, a stored checkpoint and the data.

  Writes nothing: every bad input fails here.

  Args:
    config: the run config.
    workdir: the run's workdir.
    load_data: load the data (a dry run does not need it).

  Returns:
    The checked setup.

  Raises:
    TrainerError: a bad config, workdir, data source, hook or checkpoint.
  """
  validation.validate(config)
  _check_hooks(config)
  workdir = os.path.abspath(os.path.expanduser(workdir)) if workdir else workdir
  topology = distributed.topology(config.mesh.axes, config.mesh.shape,
                                  config.partition_rules)
  for field in ('batch_size', 'eval_batch_size'):
    distributed.check_divisible(field, config[field], topology)
  workdir_lib.check_writable(workdir)
  compilation = xla.from_config(config)
  latest = checkpoint.resume_step(workdir, config.resume_step)
  resolved = resume.to_json_dict(config)
  stored_meta = None
  if latest is not None:
    ckpt_dir = checkpoint.directory(workdir)
    stored = checkpoint.read_json(ckpt_dir, latest, 'config')
    for field, old, new in resume.check(stored, resolved,
                                        f'{ckpt_dir}/{latest}'):
      logging.info('Resume: config.%s changes from %r to %r.', field, old, new)
    stored_meta = checkpoint.read_json(ckpt_dir, latest, 'meta')
    change = xla.resume_change(stored_meta.get('xla'), compilation)
    if change:
      logging.warning(change)
  data = None
  if load_data:
    data = data_lib.load(config.data_source, config.data_dir, config.classes)
    if stored_meta and stored_meta['data_source'] != data.source:
      raise CheckpointError(
          f'the checkpoint in {workdir} was trained on data_source='
          f'{stored_meta["data_source"]!r}, but this run resolves to '
          f'{data.source!r}; set --config.data_source='
          f'{stored_meta["data_source"]} or use a new --workdir.')
    if data_lib.steps_per_epoch(data.train, config.batch_size) < 1:
      raise ConfigError(
          f'config.batch_size={config.batch_size} is larger than the train '
          f'split ({data.train.size} examples); use a smaller batch.')
  loop = schedule(config, data.train.size if data else 0)
  try:
    model = models.build(config.model.name, validation.num_classes(config),
                         config.model.api)
  except ValueError as e:  # An NNX model holding non-param state.
    raise ConfigError(f'config.model.name={config.model.name!r}: {e}') from e
  setup = Setup(
      workdir=workdir, stored_config=resolved, seed=config.seed,
      classes=tuple(int(c) for c in config.classes),
      model_name=config.model.name, init_from=config.init_from,
      hook_lists={phase: hook_entries(config, phase) for phase in HOOK_PHASES},
      schedule=loop, topology=topology, data=data, model=model,
      tx=optimizers.create(config.optimizer, loop.num_train_steps),
      freeze=freeze_schedule(config), latest_step=latest,
      resume_step=config.resume_step,
      compilation_cache_dir=config.compilation_cache_dir,
      compilation=compilation)
  try:
    setup.tx_at(0)
  except ValueError as e:
    raise ConfigError(f'config.freeze: {e}') from e
  topology.check(hooks.flatten(setup.abstract_params))
  return setup


def _init_state(model: models.Model, tx: optax.GradientTransformation,
                rng: jax.Array) -> TrainState:
  return TrainState.create(apply_fn=model.apply, params=model.init(rng), tx=tx)


def abstract_state(setup: Setup, step: int = 0) -> TrainState:
  """The TrainState's shapes, dtypes and shardings; no memory allocated.

  The shardings are config.partition_rules' (`distributed.Topology`):
  restores and surgery place every leaf with them.
  """
  shapes = jax.eval_shape(
      functools.partial(_init_state, setup.model, setup.tx_at(step)),
      jax.random.key(setup.seed))
  return jax.tree.map(
      lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                               sharding=sharding),
      shapes, setup.topology.shardings(shapes))


def initial_state(setup: Setup) -> TrainState:
  """The fresh TrainState of the run's seed, each leaf made in its shard.

  Each device computes only its shards (no replicated copy first); the
  values do not depend on the sharding (JAX's partitionable threefry).
  """
  init = functools.partial(_init_state, setup.model, setup.tx_at(0))
  key = jax.random.key(setup.seed)
  shardings = setup.topology.shardings(jax.eval_shape(init, key))
  return jax.jit(init, out_shardings=shardings)(key)


def enter_phase(setup: Setup, state: TrainState, step: int) -> TrainState:
  """Rebuilds the optimizer for the freeze phase of `step` if it differs.

  Slots are carried over by param key; slots of newly trainable params start
  fresh (count 0 with hooks.optim's Adam: no bias-correction kick).

  Args:
    setup: the run.
    state: a state built for some other phase (or the same one).
    step: the step the state is at.

  Returns:
    The state with the optimizer of `step`'s phase.
  """
  tx = setup.tx_at(step)
  if tx is state.tx:
    return state
  new_state = jax.eval_shape(functools.partial(_init_state, setup.model, tx),
                             jax.random.key(0))
  if (jax.tree.structure(new_state.opt_state)
      == jax.tree.structure(state.opt_state)):
    return state.replace(tx=tx)
  opt_state = hooks.carry_opt_state(hooks.flatten(state.opt_state), tx,
                                    state.params)
  logging.info('Freeze phase at step %d: frozen %s.', step,
               list(setup.freeze.phase_at(step)) or 'nothing')
  # Fresh slots follow their params' shardings; carried ones stay put.
  return setup.topology.place(state.replace(tx=tx, opt_state=opt_state))
