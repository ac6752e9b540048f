"""One pipeline for every surgery: source -> hooks -> structure check -> place.

``apply`` edits a live state (after init: warm starts, resizes,
re-initialization); ``restore`` reads a checkpoint through hooks into a
target state (renames, migrations, resizes of a foreign checkpoint). Both
run abstractly with ``dry_run=True`` (nothing read, nothing allocated: the
plan), open each donor once through ``Sources`` and return the report.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from absl import logging
import jax
import numpy as np

from hooks import api
from hooks import copy_plan
from hooks import nnx_donor
from hooks import report as report_lib
from hooks import select
from hooks import validation
from hooks import views
from hooks.runner import Entry
from hooks.runner import gc_paused
from hooks.runner import is_abstract
from hooks.runner import run_flat
from hooks.sources import Sources

__all__ = ['apply', 'plan', 'restore']

State = TypeVar('State')
Flat = dict[str, Any]


def _sharding(leaf: Any) -> jax.sharding.Sharding | None:
  return getattr(leaf, 'sharding', None)


def _place(flat: Flat, like: Mapping[str, Any], *, default: bool = False
           ) -> Flat:
  """Puts every leaf that is not yet where ``like``'s leaf is, in one batch.

  Leaves whose ``like`` has no sharding stay as they are, or go to the
  default device when ``default``; so do the very leaves of ``like`` (what
  hooks kept) unless ``default``.
  """
  out = dict(flat)
  keys, values, shardings = [], [], []
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  for key, leaf in flat.items():
    old = like.get(key)
    if leaf is old and not default:
      continue
    sharding = _sharding(old)
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


@gc_paused()
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

  An NNX model, or ``(model, nnx.Optimizer)``, is edited through its flat
  view (``hooks.nnx_state``: the same keys as a Linen ``TrainState``) and
  updated in place with ``nnx.update`` once every hook has succeeded; a dry
  run leaves it untouched and returns an abstract copy.

  Args:
    state: A ``flax.training.train_state.TrainState`` (or any pytree), or an
      NNX model or ``(model, optimizer)``; concrete or abstract
      (``jax.ShapeDtypeStruct`` leaves: a dry run).
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
  view = views.of(state)
  flat, write = view.split(state)
  abstract = dry_run or is_abstract(flat)
  if abstract:
    state = view.abstract(state)  # A dry run leaves the state alone.
    flat, write = view.split(state)
  result, report = run_flat(
      flat, entries, expected=validation.expected_structure(flat), rng=rng,
      fresh=view.fresh(fresh, state), sources=sources, validate_each=True)
  if not abstract:
    result = _place(result, flat)
  return write(result), report


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


def _step_as(flat: Flat, target: Mapping[str, Any]) -> Flat:
  """Gives the checkpoint's ``step`` the target's integer dtype, by value.

  A Linen ``TrainState`` counts steps in ``int32``, an ``nnx.Optimizer`` in
  ``uint32``: either restores into the other (a value that would wrap is an
  error).
  """
  if 'step' not in flat or 'step' not in target:
    return flat
  shape, dtype = validation.shape_dtype(flat['step'])
  want = np.dtype(validation.shape_dtype(target['step'])[1])
  if np.dtype(dtype) == want or np.dtype(dtype).kind not in 'iu' or (
      want.kind not in 'iu'):
    return flat
  out = dict(flat)
  if isinstance(flat['step'], jax.ShapeDtypeStruct):
    out['step'] = jax.ShapeDtypeStruct(shape, want)
  else:
    copy_plan.check_fits('step', flat['step'], want)
    out['step'] = np.asarray(flat['step']).astype(want)
  return out


@gc_paused()
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
      ``sharding``, when set, places the result); an NNX model or
      ``(model, optimizer)`` is updated in place (unless ``dry_run``).
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
  opened = reader
  view = views.of(target)
  if dry_run:
    target = view.abstract(target)
  target_flat, write = view.split(target)
  if reader.form == nnx_donor.FORM:  # No collections stored: the target's.
    reader = nnx_donor.view(reader, select.nnx_reads(target_flat),
                            skip=view.rng_paths(target))
  fresh = view.fresh(fresh, target)
  structure = reader.structure()
  flat = dict(structure) if dry_run else reader.read(list(structure))
  flat = _step_as(flat, target_flat)
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
  if opened not in sources.readers():
    report.add_source(reader.provenance())
  logging.debug('Restored %s through %d hooks.', reader.path, len(entries))
  return write(result), report
