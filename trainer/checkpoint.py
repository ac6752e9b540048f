"""Orbax checkpoints of a run: the TrainState, the resolved config, metadata.

Layout: `<workdir>/checkpoints/<step>/{state,config,meta}`. Writes are atomic
(orbax commits a step only when it is complete). The latest K steps are kept,
plus the one with the best eval accuracy. Every restore goes through
`restore`, which checks the stored structure against the target first.

The state is stored in chunks of at most CHUNK_BYTES, and at most one
written shard (`save_args`): a reader that holds part of a tensor (a
restore into another sharding, a warm start of a sharded model, a process
of a multi-process run) reads the chunks its part overlaps, not the whole
tensor, so a run's checkpoints make good donors whatever topology wrote
them.

A step whose files cannot be read back (truncated, missing) fails with a
CheckpointError that names the step directory and the way out
(`config.resume_step`, the newest earlier step that reads back whole); any
reader of checkpoint files can raise the same through `reading`.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Callable, Iterator

from absl import logging
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

import hooks
from hooks import ocdbt
from trainer.errors import CheckpointError
from trainer.errors import ConfigError
from trainer.errors import TrainerError

SUBDIR = 'checkpoints'
# Where config.resume_step moves the steps after the one it resumes from.
SET_ASIDE_SUBDIR = 'checkpoints_set_aside'
ITEMS = ('state', 'config', 'meta')
# The largest stored chunk. Smaller chunks waste less of a partial read but
# cost more per chunk; orbax warns below 1 MiB.
CHUNK_BYTES = 1 << 20
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


def steps(workdir: str) -> list[int]:
  """The complete checkpoint steps in `workdir`, ascending."""
  ckpt_dir = directory(workdir)
  if not os.path.isdir(ckpt_dir):
    return []
  with contextlib.closing(reader(ckpt_dir)) as manager:
    return sorted(manager.all_steps())


def latest_step(workdir: str) -> int | None:
  """The newest complete checkpoint step in `workdir`, or None."""
  found = steps(workdir)
  return found[-1] if found else None


def resume_step(workdir: str, requested: int | None) -> int | None:
  """The step a run in `workdir` resumes from; None for a fresh workdir.

  Args:
    workdir: the run's workdir.
    requested: config.resume_step (None: the latest step).

  Returns:
    `requested`, or the latest step.

  Raises:
    ConfigError: `requested` is not a checkpoint step of the workdir.
  """
  found = steps(workdir)
  if requested is None:
    return found[-1] if found else None
  if requested not in found:
    raise ConfigError(
        f'config.resume_step={requested} is not a checkpoint step of '
        f'{directory(workdir)} (it has {found or "none"}); use one of them, '
        'or unset it to resume from the latest.')
  return requested


def _root_cause(error: BaseException) -> str:
  # orbax wraps tensorstore's precise error ("OUT_OF_RANGE: ... byte range")
  # in one that quotes a whole TensorStore spec; the innermost one says it.
  while (error.__cause__ or error.__context__) is not None:
    error = error.__cause__ or error.__context__
  lines = str(error).strip().splitlines()
  text = lines[0].split(' [tensorstore_spec=')[0] if lines else ''
  if len(text) > 300:
    text = text[:300] + '...'
  return f'{type(error).__name__}: {text}' if text else type(error).__name__


def unreadable(path: str, error: BaseException,
               way_out: str) -> CheckpointError:
  """The error for a checkpoint whose files cannot be read back.

  Args:
    path: the checkpoint (a step directory, a donor path), as the user knows
      it.
    error: what the reader (orbax, tensorstore, msgpack, the OS) raised.
    way_out: what the user can do instead, one or two sentences.

  Returns:
    A CheckpointError naming `path`, the reader's own first line, and the
    way out; raise it `from error`.
  """
  return CheckpointError(
      f'checkpoint {path} cannot be read: it is damaged or incomplete '
      f'({_root_cause(error)}). Nothing was changed on disk. {way_out}')


@contextlib.contextmanager
def reading(path: str, way_out: str | Callable[[], str]) -> Iterator[None]:
  """Turns any error of reading the checkpoint `path` into `unreadable`'s.

  TrainerErrors (a structure mismatch, say) pass through unchanged. Wrap
  only the reads themselves, so that a bug elsewhere is not reported as a
  damaged file.

  Args:
    path: the checkpoint, for the message.
    way_out: the way out, or a function that finds it (called only on
      error, e.g. to look for an intact earlier step).

  Yields:
    Nothing.

  Raises:
    CheckpointError: the read failed.
  """
  try:
    yield
  except TrainerError:
    raise
  except Exception as e:  # pylint: disable=broad-exception-caught
    # orbax raises bare Exceptions, tensorstore ValueErrors, the OS OSErrors.
    raise unreadable(path, e,
                     way_out() if callable(way_out) else way_out) from e


def check_stored_values(ckpt_dir: str, step: int) -> None:
  """Reads every stored value of a step's state, one at a time.

  The same check a donor read makes (`hooks.ocdbt.check_values`): it finds
  a truncated or missing file before orbax's restore, which reads all
  arrays at once and, when one read fails, leaves tracebacks at exit.

  Raises:
    FileNotFoundError: no stored values, or a value whose file is missing.
    ValueError: tensorstore's error for a truncated or unreadable file.
  """
  ocdbt.check_values(os.path.join(ckpt_dir, str(step), 'state'))


def _reads_back(ckpt_dir: str, step: int) -> bool:
  """Whether every item of a step reads back (the whole state is read)."""
  try:
    check_stored_values(ckpt_dir, step)
    read_json(ckpt_dir, step, 'config')
    read_json(ckpt_dir, step, 'meta')
    jax.block_until_ready(read_raw(ckpt_dir, step))
  except Exception:  # pylint: disable=broad-exception-caught
    return False
  return True


def way_out_of(ckpt_dir: str, step: int) -> str:
  """What to do when step `step` of a run's own `ckpt_dir` is damaged.

  Reads the earlier steps, newest first, until one reads back whole: the
  error path only.
  """
  workdir = os.path.dirname(ckpt_dir)
  with contextlib.closing(reader(ckpt_dir)) as manager:
    found = sorted(manager.all_steps())
  for earlier in reversed([s for s in found if s < step]):
    if _reads_back(ckpt_dir, earlier):
      later = [s for s in found if s > earlier]
      return (
          f'To resume from step {earlier}, the newest earlier checkpoint '
          'that reads back whole, run the same command with '
          f'--config.resume_step={earlier}: the steps after it {later} are '
          f'then moved to {os.path.join(workdir, SET_ASIDE_SUBDIR)} (not '
          'deleted) and trained again. Or start afresh with another '
          '--workdir.')
  return (f'No earlier checkpoint in {ckpt_dir} reads back whole; start '
          'afresh with another --workdir.')


def set_aside(workdir: str, after: int) -> list[str]:
  """Moves the step directories after `after` out of the checkpoints.

  They go to `<workdir>/checkpoints_set_aside/<step>` (`<step>.1`, ... when
  that exists), so that the run can save those steps again; nothing is
  deleted. Process 0 moves; every process waits for it.

  Args:
    workdir: the run's workdir.
    after: the step the run resumes from.

  Returns:
    The new paths of the moved steps.
  """
  later = [s for s in steps(workdir) if s > after]
  moved = []
  if later and jax.process_index() == 0:
    target_dir = os.path.join(os.path.abspath(workdir), SET_ASIDE_SUBDIR)
    os.makedirs(target_dir, exist_ok=True)
    for step in later:
      target, n = os.path.join(target_dir, str(step)), 0
      while os.path.exists(target):
        n += 1
        target = os.path.join(target_dir, f'{step}.{n}')
      os.rename(os.path.join(directory(workdir), str(step)), target)
      logging.warning('config.resume_step=%d: moved checkpoint step %d to %s.',
                      after, step, target)
      moved.append(target)
  if later and jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('trainer.checkpoint.set_aside')
  return moved


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


def chunk_byte_size(leaf: Any) -> int | None:
  """The chunk size to store `leaf` in: CHUNK_BYTES, where it splits a shard.

  Orbax writes each shard of an array (for a replicated array, each
  replica's slice of it) as one chunk by default. With
  `ocp.SaveArgs(chunk_byte_size=n)` it splits the shard into chunks of at
  most n bytes, the largest dimensions first; each chunk is then at most
  one shard and at most CHUNK_BYTES.

  Args:
    leaf: a leaf of the state.

  Returns:
    CHUNK_BYTES, or None where a shard is no larger (orbax's one chunk per
    shard is then small enough).
  """
  if not isinstance(leaf, jax.Array) or leaf.ndim == 0:
    return None
  shard = math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
  return CHUNK_BYTES if shard > CHUNK_BYTES else None


def save_args(state: Any) -> Any:
  """`ocp.SaveArgs` for every leaf of `state`: chunks of `chunk_byte_size`."""
  return jax.tree.map(
      lambda leaf: ocp.SaveArgs(chunk_byte_size=chunk_byte_size(leaf)), state)


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         config: dict[str, Any], meta: dict[str, Any],
         metrics: dict[str, float] | None = None) -> None:
  """Writes one checkpoint (the state, the resolved config and metadata).

  The state is stored in chunks of at most CHUNK_BYTES (`save_args`).
  """
  manager.save(step, force=True, metrics=metrics, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state, save_args=save_args(state)),
      config=ocp.args.JsonSave(config),
      meta=ocp.args.JsonSave(meta)))
  manager.wait_until_finished()


def read_json(ckpt_dir: str, step: int, item: str) -> dict[str, Any]:
  """Reads the `config` or `meta` item of one checkpoint step.

  Raises:
    CheckpointError: the item cannot be read (damaged or missing files).
  """
  with reading(f'{ckpt_dir}/{step}', lambda: way_out_of(ckpt_dir, step)):
    with contextlib.closing(reader(ckpt_dir)) as manager:
      return manager.restore(step, args=ocp.args.Composite(
          **{item: ocp.args.JsonRestore()}))[item]


def stored_structure(ckpt_dir: str,
                     step: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Flat key -> shape and dtype of a stored state, from metadata alone.

  The keys are `hooks.flatten`'s, as for every donor and init_from.
  """
  with contextlib.closing(reader(ckpt_dir)) as manager:
    metadata = manager.item_metadata(step)['state']
  if metadata is None:  # orbax's answer when state/_METADATA is missing.
    raise FileNotFoundError(f'{ckpt_dir}/{step}/state has no readable '
                            'metadata (state/_METADATA)')
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
  with contextlib.closing(reader(ckpt_dir)) as manager:
    metadata = manager.item_metadata(step)['state']
    target = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype,
                                          sharding=sharding), metadata)
    return manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))['state']


def restore(target: Any, ckpt_dir: str, step: int) -> Any:
  """Restores a run's own TrainState: the one way a resume reads state.

  The checkpoint must have the target's structure (keys, shapes, dtypes,
  checked from metadata first; Adam counts may be expanded, as surgery or
  older runs left them) and is read straight into the target's layout; a
  count uniform along an axis comes back with size 1 there
  (`hooks.optim.compact_counts`: an older run's per-element counts become
  one per tensor, the updates the same). Checkpoints from elsewhere
  (init_from, donors) go through `hooks.restore` and `hooks.apply` instead
  (trainer/surgery.py).

  Args:
    target: the abstract TrainState (ShapeDtypeStructs with shardings).
    ckpt_dir: the run's checkpoints directory.
    step: the step to restore.

  Returns:
    The restored TrainState, placed like `target`.

  Raises:
    CheckpointError: the checkpoint does not fit the target, or cannot be
      read back: every array is read here, so this is also the check that
      the step is whole.
  """
  expected = hooks.expected_structure(hooks.flatten(target))
  with reading(f'{ckpt_dir}/{step}', lambda: way_out_of(ckpt_dir, step)):
    check_stored_values(ckpt_dir, step)
    stored = stored_structure(ckpt_dir, step)
    _check(stored, expected, f'checkpoint {ckpt_dir}/{step}')
    with contextlib.closing(reader(ckpt_dir)) as manager:
      state = jax.block_until_ready(manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(
              _stored_shapes(target, stored))))['state'])
  # Per-element Adam counts of older runs become one per tensor (same math).
  return hooks.unflatten(hooks.optim.compact_counts(hooks.flatten(state)),
                         state)


def _stored_shapes(target: Any, stored: FlatState) -> Any:
  """`target` with the stored shape of every leaf `_check` let differ.

  Only hooks.optim's counts may (surgery expands them along the axes it
  edits; older runs stored one per element); they keep their sharding.
  """
  flat = hooks.flatten(target)
  return hooks.unflatten({
      k: v if v.shape == stored[k].shape else jax.ShapeDtypeStruct(
          stored[k].shape, v.dtype, sharding=v.sharding)
      for k, v in flat.items()}, target)


def _check(flat: FlatState, expected: dict[str, jax.ShapeDtypeStruct],
           where: str) -> None:
  try:
    hooks.check_structure(flat, expected)
  except hooks.StructureError as e:
    raise CheckpointError(f'{where} does not fit the state this config '
                          f'builds:\n{e}') from e
