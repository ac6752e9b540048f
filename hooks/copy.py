"""Hooks ``copy_params``, ``copy_slots``, ``copy_step``: pieces of a warm start.

Each copies one part of a donor checkpoint into the state: the model
variables (``params/``, ``batch_stats/``, any collection), the optimizer
slots of the copied params (moved exactly like their params), or the step
and scalar counts. ``warm_start`` composes them; a researcher may list them
alone. Every problem is listed at once, before anything is read; only the
tensors copied are read (none in plan mode).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging
import jax
import numpy as np

from hooks import api
from hooks import copy_plan
from hooks import registry
from hooks import select
from hooks import shards
from hooks import transfer
from hooks import validation

__all__ = ['copy_params', 'copy_slots', 'copy_step', 'execute']

# Host memory a copy may hold at once for donor tensors being placed.
_READ_BYTES = 4 * 2**20


def _read_groups(keys: Sequence[str], structure: Mapping[str, Any]
                 ) -> list[list[str]]:
  """Splits ``keys`` into groups of at most _READ_BYTES (or one key)."""
  groups: list[list[str]] = []
  size = 0
  for key in keys:
    struct = structure[key]
    nbytes = int(np.prod(struct.shape)) * np.dtype(struct.dtype).itemsize
    if not groups or size + nbytes > _READ_BYTES:
      groups.append([])
      size = 0
    groups[-1].append(key)
    size += nbytes
  return groups


def _transferred(items: Any) -> dict[str, Any]:
  """The new leaves: (key, old leaf, transfer, donor value) -> key -> leaf.

  Whole copies to the device go in one batched ``jax.device_put``.
  """
  out: dict[str, Any] = {}
  batch_keys, batch_values, batch_shardings = [], [], []
  for key, leaf, plan, value in items:
    copy_plan.check_fits(key, value, validation.shape_dtype(leaf)[1])
    if not transfer.on_device(leaf, plan.target_shape):
      dtype = validation.shape_dtype(leaf)[1]
      out[key] = transfer.place(plan.apply(leaf, value, dtype), leaf)
    elif plan.is_copy and not isinstance(value, jax.Array):
      batch_keys.append(key)
      batch_values.append(np.asarray(value, dtype=leaf.dtype))
      batch_shardings.append(leaf.sharding)
    else:
      out[key] = plan.apply_on_device(leaf, value, leaf)
  if batch_keys:
    out.update(zip(batch_keys, jax.device_put(batch_values, batch_shardings)))
  return out


def execute(plan: copy_plan.Plan, flat: dict, ctx: api.Context,
            reader: api.DonorReader, hook: str) -> dict:
  """Raises the plan's errors, or reports and performs its copies.

  Donor tensors are read a group at a time (up to ``_READ_BYTES``, or one
  tensor) and each group is placed before the next is read: the host holds
  one group; a whole copy into a split leaf reads only this process's shards
  (``hooks.shards``). Device leaves are computed on their devices: no device
  value goes to the host. Nothing is read in plan mode (``ctx.abstract``).

  Returns:
    The new flat state.

  Raises:
    ValueError: Listing every problem of the plan.
  """
  plan.raise_errors(hook, f'donor {reader.path!r}')
  out = dict(flat)
  targets: dict[str, list[tuple[str, transfer.Transfer]]] = {}
  for key, copy in plan.copies.items():
    targets.setdefault(copy.donor_key, []).append((key, copy.transfer))
    ctx.report.record(key, 'copied', source=copy.donor_key, detail=copy.detail)
    if copy.transfer.target_shape != copy.transfer.source_shape:
      ctx.report.record(key, 'resized', from_shape=copy.transfer.source_shape,
                        shape=copy.transfer.target_shape)
    if ctx.abstract and copy.transfer.target_shape != np.shape(flat[key]):
      out[key] = jax.ShapeDtypeStruct(  # A count (hooks.counts) grew.
          copy.transfer.target_shape, validation.shape_dtype(flat[key])[1])
  if not ctx.abstract:
    structure = reader.structure()
    sharded = shards.read_shards(reader, targets, flat)  # Split leaves.
    out.update(kv for placed in sharded.values() for kv in placed.items())
    if note := shards.whole_reads_note(reader, sharded):
      ctx.report.note(note)
    for group in _read_groups(sorted(set(targets) - set(sharded)), structure):
      values = reader.read(group)
      placed = _transferred(
          (key, flat[key], t, values[donor_key])
          for donor_key in group for key, t in targets[donor_key])
      # Host buffers are released only when their copies are done.
      jax.block_until_ready(placed)
      out.update(placed)
      del values, placed
  logging.debug('%s: copied %d leaves from %s.', hook, len(plan.copies),
               reader.path)
  return out


@registry.register('copy_params')
def copy_params(
    donor: str,
    include: Sequence[str] = ('.*',),
    exclude: Sequence[str] = (),
    rename: Sequence[Sequence[str]] = (),
    labels: Sequence[Mapping[str, Any]] = (),
    on_shape_mismatch: str = 'error',
    on_dtype_mismatch: str = 'error',
    item: str | None = None,
    donor_step: int | None = None,
) -> api.HookFn:
  r"""Copies model variables from a donor: every key outside ``opt_state/``.

  Each selected target variable ``<collection>/<path>`` (``params/``,
  ``batch_stats/``, ...) takes the donor's (a TrainState, a variables dict,
  bare params or a ``flax.optim`` file: see ``select.donor_prefix``).

  Args:
    donor: A checkpoint path in any form ``hooks.open_donor`` reads.
    include: Regexes over the path inside the collection (``re.fullmatch``),
      e.g. ``'Conv_0/.*'`` for ``params/Conv_0/*`` and
      ``batch_stats/Conv_0/*``; each must match a variable.
    exclude: Regexes of variables not to copy; each must match one.
    rename: ``(target regex, donor path template)`` rules, first match wins,
      e.g. ``('Dense_9/(.*)', r'Dense_1/\1')``; a third element overrides
      ``on_shape_mismatch`` for the rule. Each must match a selected path.
    labels: Label specs (``hooks.labels``), e.g. ``[{'layers': 'head',
      'donor': [0, 1, 2, 3, 4], 'target': list(range(10))}]``: entries of
      that axis are copied by label, the others keep their value.
    on_shape_mismatch: ``'error'`` (list every mismatch), ``'skip'`` (keep
      the target's value) or ``'overlap'`` (copy ``[:min]`` on each axis).
    on_dtype_mismatch: ``'error'`` or ``'cast'`` (to the target's dtype).
    item: The CheckpointManager item to read, when a step has several.
    donor_step: The donor's step to read; default its latest.

  Returns:
    The hook function.

  Raises:
    ValueError: If a parameter is malformed (no I/O here); when the hook
      runs, listing every mismatch between donor and target.
  """
  donor = select.check_donor('copy_params', donor, item, donor_step)
  opts = select.options('copy_params', include, exclude, rename, labels,
                        on_shape_mismatch, on_dtype_mismatch)

  def hook_fn(flat: dict, ctx: api.Context) -> dict:
    reader = select.open_source(ctx, donor, item, donor_step, opts)
    plan = copy_plan.plan_variables(flat, reader.structure(), opts)
    return execute(plan, flat, ctx, reader, 'copy_params')

  hook_fn.__name__ = 'copy_params'
  return hook_fn


@registry.register('copy_slots')
def copy_slots(
    donor: str,
    include: Sequence[str] = ('.*',),
    exclude: Sequence[str] = (),
    rename: Sequence[Sequence[str]] = (),
    labels: Sequence[Mapping[str, Any]] = (),
    on_shape_mismatch: str = 'error',
    on_dtype_mismatch: str = 'error',
    item: str | None = None,
    donor_step: int | None = None,
) -> api.HookFn:
  """Copies the donor's optimizer slots of the selected params.

  Takes ``copy_params``'s selection and moves each slot exactly like its
  param (the same label entries, the same slices). Slots match by optimizer
  path with ``optax.partition``'s ``inner_states/<label>/inner_state/``
  removed, so a frozen donor feeds an unfrozen target and back. Scalar
  optimizer leaves (counts) are not slots: see ``copy_step``.

  Args:
    donor, include, exclude, rename, labels, on_shape_mismatch,
    on_dtype_mismatch, item, donor_step: As for ``copy_params``.

  Returns:
    The hook function.

  Raises:
    ValueError: As for ``copy_params``; also when the donor lacks a slot.
  """
  donor = select.check_donor('copy_slots', donor, item, donor_step)
  opts = select.options('copy_slots', include, exclude, rename, labels,
                        on_shape_mismatch, on_dtype_mismatch)

  def hook_fn(flat: dict, ctx: api.Context) -> dict:
    reader = select.open_source(ctx, donor, item, donor_step, opts)
    structure = reader.structure()
    params = copy_plan.plan_variables(flat, structure, opts)
    slots = copy_plan.plan_slots(flat, structure, params, on_dtype_mismatch)
    # The selection's problems are the slots' too; the params' dtypes not.
    plan = dataclasses.replace(params, copies={}, dtype_errors=[]).merge(slots)
    return execute(plan, flat, ctx, reader, 'copy_slots')

  hook_fn.__name__ = 'copy_slots'
  return hook_fn


@registry.register('copy_step')
def copy_step(donor: str, item: str | None = None,
              donor_step: int | None = None) -> api.HookFn:
  """Copies ``step`` and the scalar ``opt_state/.../count`` leaves.

  Counts (e.g. of schedules, or ``optax.adam``'s shared count) match by key
  with ``optax.partition``'s wrapping removed; counts the donor lacks keep
  their value. Hyperparameters are not counts: the target's stay.

  Args:
    donor: A checkpoint path, as for ``copy_params``.
    item: As for ``copy_params``.
    donor_step: As for ``copy_params``.

  Returns:
    The hook function.
  """
  donor = select.check_donor('copy_step', donor, item, donor_step)

  def hook_fn(flat: dict, ctx: api.Context) -> dict:
    reader = select.open_source(ctx, donor, item, donor_step)
    plan = copy_plan.plan_step(flat, reader.structure())
    return execute(plan, flat, ctx, reader, 'copy_step')

  hook_fn.__name__ = 'copy_step'
  return hook_fn
