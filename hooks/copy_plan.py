"""Plans of the copy pieces: which target key takes which donor key, how.

``plan_variables`` pairs each selected model variable with its donor key
and a ``transfer.Transfer`` (label specs pair entries of a labelled axis);
``plan_slots`` gives the slots of those params the same transfers; and
``plan_step`` takes ``step`` and scalar counts. Every problem is gathered,
then ``Plan.raise_errors`` lists them all at once.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from absl import logging
import numpy as np

from hooks import counts as counts_lib
from hooks import flat as flat_lib
from hooks import labels as labels_lib
from hooks import pairing
from hooks import select
from hooks import transfer
from hooks import validation

__all__ = ['Copy', 'Plan', 'check_fits', 'plan_slots', 'plan_step',
           'plan_variables']

# What optax.partition puts above a partition's state (any labels): slots
# match across donor and target once it is removed.
_PARTITION = re.compile(r'(?:^|(?<=/))inner_states/[^/]+/inner_state/')


@dataclasses.dataclass(frozen=True)
class Copy:
  """One target key's value: which donor key, how, and what to report."""

  donor_key: str
  transfer: transfer.Transfer
  detail: str | None = None


@dataclasses.dataclass
class Plan:
  """What a copy piece copies, and every problem found."""

  copies: dict[str, Copy] = dataclasses.field(default_factory=dict)
  errors: list[str] = dataclasses.field(default_factory=list)
  shape_errors: list[str] = dataclasses.field(default_factory=list)
  dtype_errors: list[str] = dataclasses.field(default_factory=list)

  def merge(self, other: Plan) -> Plan:
    """Returns a plan with both plans' copies and errors."""
    return Plan({**self.copies, **other.copies}, self.errors + other.errors,
                self.shape_errors + other.shape_errors,
                self.dtype_errors + other.dtype_errors)

  def check_dtype(self, key: str, leaf: Any, donor_key: str, donor: Any,
                  policy: str) -> None:
    t, d = _dtype(leaf), np.dtype(donor.dtype)
    if t != d and policy == 'error':
      self.dtype_errors.append(f'  {key}: target {t.name}, donor {donor_key} '
                               f'{d.name}')

  def raise_errors(self, hook: str, where: str) -> None:
    """Raises one ValueError listing every problem, if there is any."""
    errors = list(dict.fromkeys(self.errors))
    if self.shape_errors:
      errors.append(
          f'{len(self.shape_errors)} shape mismatch(es) with {where} '
          "(on_shape_mismatch='error'):\n" + '\n'.join(self.shape_errors) +
          '\n  Fix: exclude these variables, rename them to the right donor '
          "paths, or set on_shape_mismatch='skip' or 'overlap'.")
    if self.dtype_errors:
      errors.append(
          f'{len(self.dtype_errors)} dtype mismatch(es) with {where} '
          "(on_dtype_mismatch='error'):\n" + '\n'.join(self.dtype_errors) +
          "\n  Fix: set on_dtype_mismatch='cast'.")
    if errors:
      raise ValueError(f'{hook}: ' + '\n'.join(errors))


def _dtype(leaf: Any) -> np.dtype:
  return np.dtype(validation.shape_dtype(leaf)[1])


def plan_variables(flat: Mapping[str, Any], structure: Mapping[str, Any],
                   opts: select.Options) -> Plan:
  """Plans the copy of every selected model variable from the donor.

  Args:
    flat: The target flat state (concrete or abstract).
    structure: The donor's key -> ``ShapeDtypeStruct``.
    opts: The checked options.

  Returns:
    The plan: target key -> ``Copy``, and every error found.
  """
  plan = Plan()
  donor_keys, plan.errors = select.donor_keys(flat, structure, opts)
  for key, (donor_key, policy) in donor_keys.items():
    t_shape = tuple(np.shape(flat[key]))
    d_shape = tuple(structure[donor_key].shape)
    spec = labels_lib.spec_for(opts.labels, select.split(key)[1])
    index, detail = None, None
    if spec is not None:
      try:
        # Entries of labels the donor lacks keep the state's own values.
        index, detail = pairing.axis_index(spec, t_shape, d_shape, key=key,
                                           source_key=donor_key, new='kept')
      except ValueError as e:
        plan.errors.append(str(e))
        continue
    plan_ = transfer.plan(t_shape, d_shape, labelled=index,
                          overlap=policy == 'overlap')
    if plan_ is None:
      if policy == 'skip':
        logging.info('%s: skipping %s: target %s, donor %s %s.', opts.hook,
                     key, t_shape, donor_key, d_shape)
        continue
      reason = ' (ranks differ: cannot overlap)' if policy == 'overlap' else ''
      plan.shape_errors.append(
          f'  {key}: target {t_shape}, donor {donor_key} {d_shape}{reason}')
      continue
    if plan_.is_empty:
      logging.info('%s: %s shares no label with the donor; it keeps its '
                   'value.', opts.hook, key)
      continue
    plan.check_dtype(key, flat[key], donor_key, structure[donor_key],
                     opts.on_dtype_mismatch)
    plan.copies[key] = Copy(donor_key, plan_, detail)
  return plan


def _slots_by_kind(slots: list[str], param_key: str) -> dict[str, str]:
  """Slot keys by their optimizer path with partitions removed."""
  return {_PARTITION.sub('', flat_lib.split_slot(s, param_key) + '/'): s
          for s in slots}


def plan_slots(flat: Mapping[str, Any], structure: Mapping[str, Any],
               params: Plan, dtype_policy: str) -> Plan:
  """Plans the donor slots of the params ``params`` copies, moved alike.

  Each target slot of a copied ``params/`` key takes the donor slot of its
  donor param with the same optimizer path once ``optax.partition``'s
  ``inner_states/<label>/inner_state/`` is removed (so a frozen donor feeds
  an unfrozen target and back), with the param's transfer: the same label
  entries, the same slices (a count as ``hooks.counts`` says).

  Args:
    flat: The target flat state.
    structure: The donor's key -> ``ShapeDtypeStruct``.
    params: The plan of the params (``plan_variables``).
    dtype_policy: ``on_dtype_mismatch``.

  Returns:
    A plan of the slots only (``params``'s errors are not repeated).
  """
  plan = Plan()
  copied = {k: c for k, c in params.copies.items() if k.startswith('params/')}
  if copied and not any(k.startswith('opt_state/') for k in structure):
    plan.errors.append('the donor has no optimizer state (no opt_state/ '
                       "keys) to take slots from; keep the target's slots "
                       "(opt_state='fresh', or leave out copy_slots).")
    return plan
  target_index = flat_lib.slot_index(flat)
  donor_index = flat_lib.slot_index(structure)
  missing = []
  for key, copy in copied.items():
    donor_slots = _slots_by_kind(donor_index.get(copy.donor_key, []),
                                 copy.donor_key)
    for kind, slot in _slots_by_kind(target_index[key], key).items():
      if kind not in donor_slots:
        missing.append(f'  {slot} (donor has '
                       f'{sorted(donor_slots.values()) or "no slots"} for '
                       f'{copy.donor_key})')
        continue
      donor_slot = donor_slots[kind]
      plan.check_dtype(slot, flat[slot], donor_slot, structure[donor_slot],
                       dtype_policy)
      plan.copies[slot] = Copy(donor_slot, counts_lib.slot_transfer(
          kind, copy.transfer, structure[donor_slot], flat[slot]), copy.detail)
  if missing:
    plan.errors.append(
        f'the donor lacks the slots of {len(missing)} target slot(s):\n'
        + '\n'.join(missing) + "\n  Fix: keep the target's slots "
        "(opt_state='fresh') or exclude these params.")
  return plan


def _is_scalar_count(key: str, leaf: Any) -> bool:
  return (key.startswith('opt_state/') and counts_lib.is_count(key)
          and np.shape(leaf) == () and np.issubdtype(_dtype(leaf), np.integer))


def plan_step(flat: Mapping[str, Any], structure: Mapping[str, Any]) -> Plan:
  """Plans ``step`` and the scalar ``opt_state/.../count`` leaves.

  Counts match by key with partitions removed; target counts the donor
  lacks keep their value. A ``flax.optim`` donor's step is ``state/step``.

  Args:
    flat: The target flat state.
    structure: The donor's key -> ``ShapeDtypeStruct``.

  Returns:
    The plan.
  """
  plan = Plan()
  step = next((k for k in ('step', 'state/step') if k in structure), None)
  if step is None or 'step' not in flat:
    plan.errors.append(
        "copying the step needs a 'step' key in the donor and the target; "
        f"the donor has {step is not None}, the target {'step' in flat}. "
        "Keep the target's step (step='reset', or leave out copy_step).")
    return plan
  counts = {_PARTITION.sub('', k): k for k, v in structure.items()
            if _is_scalar_count(k, v)}
  sources = {'step': step}
  for key, leaf in flat.items():
    kind = _PARTITION.sub('', key)
    if _is_scalar_count(key, leaf) and kind in counts:
      sources[key] = counts[kind]
  for key, donor_key in sources.items():
    shape = tuple(structure[donor_key].shape)
    if shape != ():
      plan.shape_errors.append(f'  {key}: target (), donor {donor_key} {shape}')
      continue
    plan.copies[key] = Copy(donor_key, transfer.plan((), ()))
  return plan


def check_fits(key: str, value: Any, dtype: Any) -> None:
  """Raises ValueError if integers copied into ``dtype`` would wrap.

  Steps (``int32`` in a TrainState, ``uint32`` in NNX) carry their value.
  """
  value, dtype = np.asarray(value), np.dtype(dtype)
  if (value.dtype == dtype or not value.size or value.dtype.kind not in 'iu'
      or dtype.kind not in 'iu'):
    return
  low, high, info = int(value.min()), int(value.max()), np.iinfo(dtype)
  if low < info.min or high > info.max:
    raise ValueError(
        f"{key}: the donor's {value.dtype.name} values {low}..{high} do not "
        f"fit the target's {dtype.name} ({info.min}..{info.max}); a copy "
        "would wrap them. Fix the donor, or keep the target's (step='reset').")
