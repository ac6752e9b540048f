"""Orbax checkpoints of a run: the TrainState, the resolved config, metadata.

Layout: `<workdir>/checkpoints/<step>/{state,config,meta}`. Writes are atomic
(orbax commits a step only when it is complete). The latest K steps are kept,
plus the one with the best eval accuracy. Every restore goes through
`restore`, which checks the stored structure against the target first.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from absl import logging
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

import hooks
from trainer.errors import CheckpointError

SUBDIR = 'checkpoints'
ITEMS = ('state', 'config', 'meta')
FlatState = dict[str, Any]


def _handlers() -> dict[str, ocp.CheckpointHandler]:
  return {'state': ocp.StandardCheckpointHandler(),
          'config': ocp.JsonCheckpointHandler(),
          'meta': ocp.JsonCheckpointHandler()}


def directory(workdir: str) -> str:
  """Where a workdir keeps its checkpoints (absolute: orbax needs that)."""
  return os.path.join(os.path.abspath(os.path.expanduser(workdir)), SUBDIR)


def reader(ckpt_dir: str) -> ocp.CheckpointManager:
  """A manager that only reads `ckpt_dir` (creates and writes nothing)."""
  return ocp.CheckpointManager(
      ckpt_dir, item_handlers=_handlers(),
      options=ocp.CheckpointManagerOptions(read_only=True, create=False))


def latest_step(workdir: str) -> int | None:
  """The newest complete checkpoint step in `workdir`, or None."""
  ckpt_dir = directory(workdir)
  if not os.path.isdir(ckpt_dir):
    return None
  return reader(ckpt_dir).latest_step()


def writer(workdir: str, keep: int) -> ocp.CheckpointManager:
  """A manager that saves into `workdir` (created if needed).

  Args:
    workdir: the run's workdir.
    keep: how many of the latest checkpoints to keep; the best one by eval
      accuracy is kept besides.

  Returns:
    The checkpoint manager; `save` decides when to write.
  """
  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(n=keep),
      checkpoint_managers.BestN(
          get_metric_fn=lambda metrics: metrics['accuracy'], n=1,
          keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      create=True, cleanup_tmp_directories=True, preservation_policy=policy,
      enable_async_checkpointing=False)
  return ocp.CheckpointManager(directory(workdir), item_handlers=_handlers(),
                               options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         config: dict[str, Any], meta: dict[str, Any],
         metrics: dict[str, float] | None = None) -> None:
  """Writes one checkpoint (the state, the resolved config and metadata)."""
  manager.save(step, force=True, metrics=metrics, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      config=ocp.args.JsonSave(config),
      meta=ocp.args.JsonSave(meta)))
  manager.wait_until_finished()


def read_json(ckpt_dir: str, step: int, item: str) -> dict[str, Any]:
  """Reads the `config` or `meta` item of one checkpoint step."""
  return reader(ckpt_dir).restore(
      step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]


def stored_structure(ckpt_dir: str,
                     step: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Flat key -> shape and dtype of a stored state, from metadata alone."""
  metadata = reader(ckpt_dir).item_metadata(step)['state']
  return {key: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype)
          for key, leaf in hooks.flatten(metadata).items()}


def read_raw(ckpt_dir: str, step: int,
             sharding: jax.sharding.Sharding | None = None) -> Any:
  """Reads a stored state as the nested dicts and lists it was saved as.

  Works whatever topology wrote the checkpoint: every array is placed with
  `sharding` (default: on the first local device).

  Args:
    ckpt_dir: a checkpoints directory.
    step: the step to read.
    sharding: where to put the arrays.

  Returns:
    The raw state tree (no TrainState, no optax types).
  """
  sharding = sharding or jax.sharding.SingleDeviceSharding(
      jax.local_devices()[0])
  manager = reader(ckpt_dir)
  metadata = manager.item_metadata(step)['state']
  target = jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype,
                                        sharding=sharding), metadata)
  return manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target)))['state']


def restore(target: Any, source: str | hooks.DonorReader,
            step: int | None = None,
            pre_restore: Callable[[FlatState], FlatState] | None = None
            ) -> Any:
  """Restores a TrainState: the one way a checkpoint enters a run.

  A run's own checkpoint (`source` is its checkpoints directory) must have
  the target's structure (keys, shapes, dtypes, checked from metadata first)
  and is read straight into the target's layout. A checkpoint from elsewhere
  (`source` is a donor reader: another run's, or a legacy flax file) is read
  flat, passed through `pre_restore` (the pre_restore hooks), checked against
  the target's structure, and unflattened into it.

  Args:
    target: the abstract TrainState (ShapeDtypeStructs with shardings).
    source: a checkpoints directory, or a reader over a foreign checkpoint.
    step: the step to restore from a checkpoints directory.
    pre_restore: an edit of a foreign flat checkpoint before it is restored.

  Returns:
    The restored TrainState, placed like `target`.

  Raises:
    CheckpointError: the checkpoint does not fit the target.
  """
  expected = hooks.expected_structure(hooks.flatten(target))
  if isinstance(source, str):
    where = f'checkpoint {source}/{step}'
    _check(stored_structure(source, step), expected, where)
    return reader(source).restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))['state']
  flat = source.read(sorted(source.structure()))
  if pre_restore is not None:
    flat = pre_restore(flat)
  _check(flat, expected, f'checkpoint {source.path} after the pre_restore '
         'hooks')
  shardings = {k: v.sharding for k, v in hooks.flatten(target).items()}
  placed = {k: jax.device_put(v, shardings[k]) for k, v in flat.items()}
  logging.info('Restored %s through %s.', source.path,
               'pre_restore hooks' if pre_restore else 'a structure check')
  return hooks.unflatten(placed, target)


def _check(flat: FlatState, expected: dict[str, jax.ShapeDtypeStruct],
           where: str) -> None:
  try:
    hooks.check_structure(flat, expected)
  except hooks.StructureError as e:
    raise CheckpointError(f'{where} does not fit the state this config '
                          f'builds:\n{e}') from e
