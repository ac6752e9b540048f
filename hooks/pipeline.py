"""One pipeline for every surgery: source -> hooks -> structure check -> place.

``apply`` edits a live state (after init: warm starts, resizes,
re-initialization); ``restore`` reads a checkpoint through hooks into a
target state (renames, migrations, resizes of a foreign checkpoint). Both
run abstractly with ``dry_run=True`` (nothing read, nothing allocated: the
plan), open each donor once through ``Sources`` and return the report.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from absl import logging
import jax

from hooks import api
from hooks import donors
from hooks import flat as flat_lib
from hooks import registry
from hooks import report as report_lib
from hooks import validation

__all__ = ['Entry', 'Sources', 'apply', 'build_all', 'plan', 'restore',
           'run_flat']

State = TypeVar('State')
Flat = dict[str, Any]
Entry = Mapping[str, Any] | api.HookFn


class Sources:
  """Opens each checkpoint once per run, and says what was read from it.

  Pass one ``Sources`` to several calls (or open a donor with it before the
  run, e.g. to read its metadata) and each path is still opened once.
  """

  def __init__(self) -> None:
    self._readers: dict[tuple[str, Any, Any], api.DonorReader] = {}

  def open(self, path: str | os.PathLike[str], *, item: str | None = None,
           step: int | None = None) -> api.DonorReader:
    """Returns the reader of ``path``, opening it on first use.

    Args:
      path: A checkpoint in any form ``hooks.open_donor`` reads.
      item: The CheckpointManager item to read, when a step has several.
      step: The step of a CheckpointManager root; default the latest.

    Returns:
      The reader (the same object for the same arguments).

    Raises:
      DonorError: If nothing readable is at ``path``.
    """
    key = (os.path.abspath(os.path.expanduser(os.fspath(path))), item, step)
    if key not in self._readers:
      self._readers[key] = donors.open_donor(key[0], item=item, step=step)
    return self._readers[key]

  def readers(self) -> list[api.DonorReader]:
    """Returns the readers opened so far, in opening order."""
    return list(self._readers.values())


def _named(entry: Entry) -> tuple[str, api.HookFn]:
  if callable(entry) and not isinstance(entry, Mapping):
    return getattr(entry, '__name__', repr(entry)), entry
  return str(dict(entry.items()).get('name')), registry.build(entry)


def build_all(entries: Sequence[Entry]) -> list[tuple[str, api.HookFn]]:
  """Builds every entry (no I/O), so a bad one fails before any hook runs.

  Args:
    entries: Entries ``{'name': ..., **params}`` or built hook functions.

  Returns:
    ``(name, hook_fn)`` pairs; built functions pass through.

  Raises:
    ValueError, UnknownHookError: If an entry cannot be built.
  """
  if isinstance(entries, Mapping) or callable(entries):
    raise ValueError(
        f'Hook entries must be a list, got {type(entries).__name__}; wrap a '
        'single entry in [...].'
    )
  return [_named(entry) for entry in entries]


def _once(fn: Callable[[], Flat]) -> Callable[[], Flat]:
  cache: list[Flat] = []

  def wrapper() -> Flat:
    if not cache:
      cache.append(fn())
    return dict(cache[0])  # A hook may edit its copy.

  return wrapper


def _fresh_flat(fresh: Callable[[], Any], abstract: bool
                ) -> Callable[[], Flat]:
  if abstract:
    return _once(lambda: flat_lib.flatten(jax.eval_shape(fresh)))
  return _once(lambda: flat_lib.flatten(fresh()))


def _run(flat: Flat, hooks: list[tuple[str, api.HookFn]], ctx: api.Context,
         validate_each: bool) -> Flat:
  """Runs built hooks in order; reports reach ``ctx.report`` only on success."""
  current = dict(flat)
  validated = None  # The last result checked in full.
  run_report = report_lib.Report()
  for index, (name, hook_fn) in enumerate(hooks):
    report = report_lib.Report()
    hook_ctx = dataclasses.replace(
        ctx, rng=jax.random.fold_in(ctx.rng, index), report=report)
    try:
      result = hook_fn(dict(current), hook_ctx)
    except Exception as e:  # pylint: disable=broad-except
      raise api.HookError(name, index, e) from e
    if not isinstance(result, dict):
      raise api.HookError(
          name, index, TypeError(f'returned {type(result).__name__}, not a dict'))
    if validate_each:
      what = f'state after hook #{index} {name!r}'
      if validated is not None and result.keys() == validated.keys():
        # Leaves a hook kept (the same objects) were checked already.
        validation.check_structure(
            {k: v for k, v in result.items() if v is not validated[k]},
            ctx.expected, what=what, partial=True)
      else:
        validation.check_structure(result, ctx.expected, what=what)
      validated = result
    run_report.merge(report, hook=name)
    current = result
  if not validate_each or not hooks:
    validation.check_structure(current, ctx.expected,
                               what='state after the last hook')
  run_report.finalize(current)
  ctx.report.merge(run_report)
  return current


def _sharding(leaf: Any) -> jax.sharding.Sharding | None:
  return getattr(leaf, 'sharding', None)


def _place(flat: Flat, like: Mapping[str, Any], *, default: bool = False
           ) -> Flat:
  """Puts every leaf that is not yet where ``like``'s leaf is, in one batch.

  Leaves whose ``like`` has no sharding stay as they are, or go to the
  default device when ``default``.
  """
  out = dict(flat)
  keys, values, shardings = [], [], []
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  for key, leaf in flat.items():
    sharding = _sharding(like.get(key))
    if sharding is None and default and not isinstance(leaf, jax.Array):
      sharding = device
    if sharding is None or isinstance(leaf, jax.ShapeDtypeStruct):
      continue
    if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
      continue
    keys.append(key)
    values.append(leaf)
    shardings.append(sharding)
  if keys:
    out.update(zip(keys, jax.device_put(values, shardings)))
  return out


def _abstract(tree: Any) -> Any:
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(*validation.shape_dtype(x),
                                     sharding=_sharding(x)), tree)


def _is_abstract(flat: Mapping[str, Any]) -> bool:
  return any(isinstance(v, jax.ShapeDtypeStruct) for v in flat.values())


def _context(expected: Mapping[str, jax.ShapeDtypeStruct], rng: jax.Array,
             fresh: Callable[[], Any] | None, sources: Sources,
             abstract: bool, checkpoint: api.DonorReader | None = None
             ) -> api.Context:
  extra = {} if fresh is None else {'fresh': _fresh_flat(fresh, abstract)}
  return api.Context(expected=expected, rng=rng, source=sources.open,
                     checkpoint=checkpoint, abstract=abstract, **extra)


def _finish(ctx: api.Context, sources: Sources) -> report_lib.Report:
  for reader in sources.readers():
    ctx.report.add_source(reader.provenance())
  return ctx.report


def run_flat(
    flat: Mapping[str, Any],
    entries: Sequence[Entry],
    *,
    expected: Mapping[str, jax.ShapeDtypeStruct],
    rng: jax.Array,
    fresh: Callable[[], Any] | None = None,
    sources: Sources | None = None,
    checkpoint: api.DonorReader | None = None,
    validate_each: bool = True,
) -> tuple[Flat, report_lib.Report]:
  """The pipeline on a flat state: hooks, then the structure check.

  ``apply`` and ``restore`` run through it; use it to test a hook over a
  flat dict. Leaves are abstract (plan mode) when any is a
  ``jax.ShapeDtypeStruct``.

  Args:
    flat: The flat state; it is not modified.
    entries: Hook entries or built hooks.
    expected: Key -> shape/dtype the result must have.
    rng: A PRNG key; each hook gets its own fold.
    fresh: Returns a fresh target state (a pytree or a flat dict).
    sources: Where donors are opened, once each.
    checkpoint: The checkpoint being restored, if any (``ctx.checkpoint``).
    validate_each: Check the structure after every hook (the input must
      have it already), not only after the last.

  Returns:
    ``(new flat state, report)``.

  Raises:
    HookError, StructureError, ValueError: As for ``apply``.
  """
  hooks = build_all(entries)
  sources = sources or Sources()
  ctx = _context(expected, rng, fresh, sources, _is_abstract(flat), checkpoint)
  result = _run(dict(flat), hooks, ctx, validate_each)
  logging.info('Ran %d hooks: %s.', len(hooks), [name for name, _ in hooks])
  return result, _finish(ctx, sources)


def apply(
    state: State,
    entries: Sequence[Entry],
    *,
    rng: jax.Array,
    fresh: Callable[[], State] | None = None,
    sources: Sources | None = None,
    dry_run: bool = False,
) -> tuple[State, report_lib.Report]:
  """Runs hooks over a state and returns the edited state and the report.

  Use it after creating the state, before the first step: warm starts,
  head resizes, re-initialization. Every field of the state is part of the
  flat view (``params``, ``opt_state``, ``step``, and extra fields such as
  ``batch_stats`` of a ``TrainState`` subclass). Every entry is built
  before any hook runs, the structure is checked after each hook, and new
  leaves are placed like the leaves they replace (same sharding).

  Args:
    state: A ``flax.training.train_state.TrainState`` (or any pytree),
      concrete or abstract (``jax.ShapeDtypeStruct`` leaves: a dry run).
    entries: Hook entries ``{'name': ..., **params}`` or built hooks.
    rng: A PRNG key; each hook gets its own fold.
    fresh: Returns a freshly initialised state of the same model and
      optimizer, for hooks that need fresh values (``reinit``, new label
      rows with ``init='init'``); called at most once.
    sources: Where donors are opened, once each; default a new one.
    dry_run: Run abstractly: nothing is read from donors and nothing is
      allocated; the returned state is abstract.

  Returns:
    ``(new_state, report)``; the report lists what happened to every param
    and slot, and the provenance of every donor opened.

  Raises:
    HookError: If a hook raises (its ``__cause__`` is the original error).
    StructureError: If a hook changes the state's keys, shapes or dtypes.
    ValueError, UnknownHookError: If an entry cannot be built.
  """
  flat = flat_lib.flatten(state)
  abstract = dry_run or _is_abstract(flat)
  if abstract:
    flat = flat_lib.flatten(_abstract(state))
  result, report = run_flat(
      flat, entries, expected=validation.expected_structure(flat), rng=rng,
      fresh=fresh, sources=sources, validate_each=True)
  if not abstract:
    result = _place(result, flat)
  return flat_lib.unflatten(result, state), report


def plan(state: Any, entries: Sequence[Entry], *, rng: jax.Array,
         fresh: Callable[[], Any] | None = None,
         sources: Sources | None = None) -> report_lib.Report:
  """Returns the report ``apply`` would give, reading and allocating nothing.

  Args:
    state: The state (concrete or abstract).
    entries: As for ``apply``.
    rng: As for ``apply``.
    fresh: As for ``apply`` (only its shapes are used).
    sources: As for ``apply``.

  Returns:
    The report of the dry run.
  """
  return apply(state, entries, rng=rng, fresh=fresh, sources=sources,
               dry_run=True)[1]


def restore(
    checkpoint: str | os.PathLike[str] | api.DonorReader,
    target: State,
    entries: Sequence[Entry] = (),
    *,
    rng: jax.Array,
    fresh: Callable[[], State] | None = None,
    sources: Sources | None = None,
    dry_run: bool = False,
) -> tuple[State, report_lib.Report]:
  """Reads a checkpoint through hooks into the structure of ``target``.

  The checkpoint is read flat (every stored tensor), passed through the
  hooks (renames, ``migrate_flax_optim``, resizes), checked against the
  target's keys, shapes and dtypes (a checkpoint that does not fit fails
  with every difference listed, and nothing is half-loaded), and placed with
  the target's shardings.

  Args:
    checkpoint: A path in any form ``hooks.open_donor`` reads, or a reader.
    target: The state to restore into, concrete or abstract (its leaves'
      ``sharding``, when set, places the result).
    entries: Hook entries run on the checkpoint before it is restored.
    rng: A PRNG key; each hook gets its own fold.
    fresh: As for ``apply``.
    sources: As for ``apply``.
    dry_run: Read nothing: the hooks run over the checkpoint's metadata.

  Returns:
    ``(state, report)``.

  Raises:
    DonorError: If the checkpoint cannot be read.
    HookError, StructureError, ValueError: As for ``apply``.
  """
  sources = sources or Sources()
  if isinstance(checkpoint, (str, os.PathLike)):
    reader = sources.open(checkpoint)
  else:
    reader = checkpoint
  target_flat = flat_lib.flatten(target)
  structure = reader.structure()
  flat = dict(structure) if dry_run else reader.read(list(structure))
  result, report = run_flat(
      flat, entries, expected=validation.expected_structure(target_flat),
      rng=rng, fresh=fresh, sources=sources, checkpoint=reader,
      validate_each=False)
  if dry_run:
    result = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                      sharding=_sharding(target_flat[k]))
              for k, v in result.items()}
  else:
    result = _place(result, target_flat, default=True)
  if reader not in sources.readers():
    report.add_source(reader.provenance())
  logging.info('Restored %s through %d hooks.', reader.path, len(entries))
  return flat_lib.unflatten(result, target), report

