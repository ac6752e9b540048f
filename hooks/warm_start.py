"""Hook ``warm_start``: copy params (and optionally their slots) from a donor."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging
import jax
import numpy as np

from hooks import api
from hooks import donors
from hooks import flat as flat_lib
from hooks import registry
from hooks import transfer
from hooks import validation

_SHAPE_POLICIES = ('error', 'skip', 'overlap')
_DTYPE_POLICIES = ('error', 'cast')
_OPT_STATE = ('fresh', 'donor')
_STEP = ('reset', 'donor')
_PARAMS = 'params/'
_UNSET = object()
# What optax.multi_transform puts above a partition's state (any labels):
# slots match across donor and target once it is removed.
_PARTITION = re.compile(r'(?:^|(?<=/))inner_states/[^/]+/inner_state/')


def _choice(name: str, value: Any, allowed: Sequence[str]) -> str:
  if value not in allowed:
    raise ValueError(
        f'warm_start: {name}={value!r} is not one of {list(allowed)}.'
    )
  return value


def _rules(
    rename: Sequence[Sequence[str]], default: str
) -> list[tuple[re.Pattern[str], str, str]]:
  if isinstance(rename, str):
    raise ValueError(
        f'warm_start: rename must be a list of (pattern, donor_key) pairs, '
        f'got the string {rename!r}.'
    )
  rules = []
  for rule in rename:
    if isinstance(rule, str) or len(rule) not in (2, 3):
      raise ValueError(
          f'warm_start: rename rule {rule!r} must be (pattern, donor_key) or '
          "(pattern, donor_key, on_shape_mismatch), e.g. ('Dense_9/(.*)', "
          r"'Dense_1/\1')."
      )
    pattern, template = rule[0], rule[1]
    policy = _choice('on_shape_mismatch', rule[2] if len(rule) == 3 else default,
                     _SHAPE_POLICIES)
    validation.match_keys([pattern], [], allow_empty=True)  # Checks the regex.
    rules.append((re.compile(pattern), str(template), policy))
  return rules


def _class_map(class_map: Mapping[Any, Any] | None) -> dict[int, int] | None:
  if class_map is None:
    return None

  def digit(value: Any) -> int:
    if isinstance(value, str) and value.strip().lstrip('-').isdigit():
      return int(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
      return int(value)
    raise ValueError(
        f'warm_start: class_map entry {value!r} must be an integer digit '
        '(class_map maps target digit -> donor digit, e.g. {5: 0}).'
    )

  return {digit(t): digit(d) for t, d in dict(class_map).items()}


def _param_prefix(structure: Mapping[str, Any]) -> str:
  """Where a donor keeps params: a TrainState, a flax.optim file, bare params."""
  for prefix in (_PARAMS, 'target/'):
    if any(k.startswith(prefix) for k in structure):
      return prefix
  return ''


def _slots_by_kind(slots: Sequence[str], param_key: str) -> dict[str, str]:
  """Slot keys by their optimizer path with multi_transform partitions removed."""
  return {
      _PARTITION.sub('', flat_lib.split_slot(s, param_key) + '/'): s
      for s in slots
  }


def _shape(leaf: Any) -> tuple[int, ...]:
  return tuple(np.shape(leaf))


def _dtype(leaf: Any) -> np.dtype:
  return np.dtype(validation.shape_dtype(leaf)[1])


def _is_scalar_count(key: str, leaf: Any) -> bool:
  return (
      key.startswith('opt_state/')
      and key.rsplit('/', 1)[-1] == 'count'
      and _shape(leaf) == ()
      and np.issubdtype(_dtype(leaf), np.integer)
  )


@registry.register('warm_start')
def warm_start(
    donor: str,
    include: Sequence[str] = ('.*',),
    exclude: Sequence[str] = (),
    rename: Sequence[Sequence[str]] = (),
    on_shape_mismatch: str = 'error',
    on_dtype_mismatch: str = 'error',
    head: str | None = 'Dense_1',
    class_map: Mapping[int, int] | None = None,
    opt_state: str = 'fresh',
    step: str = 'reset',
) -> api.HookFn:
  """Copies params from a donor checkpoint into the fresh state (post-init).

  Each selected target param ``params/<p>`` takes the donor's ``<p>`` (or the
  key a ``rename`` rule gives). The ``head`` layer's last axis is its class
  axis: its rows are copied by digit label (``class_map``, or the donor's
  recorded classes against ``ctx.classes``), so a donor on digits 0-4 fills
  rows 0-4 of a ten-digit head and a donor on 5-9 fills rows 5-9; rows with no
  donor digit keep their fresh init. Every check happens before anything is
  read; only the tensors needed are read (none in plan mode, where only
  ``donor.structure()`` is used).

  The built hook function has a ``donor`` attribute, the reader; its
  ``digest()`` hashes what was read.

  Args:
    donor: An orbax workdir, checkpoints or step directory, or a flax
      msgpack file (see ``hooks.open_donor``). A msgpack file may hold a
      TrainState (``params/...``), a ``flax.optim`` optimizer (``target/...``)
      or bare params.
    include: Regexes over target param paths without ``params/``
      (``re.fullmatch``); each must match a param.
    exclude: Regexes of params not to copy; each must match a param.
    rename: ``(target regex, donor template)`` rules, first match wins; the
      template may use ``\\1`` groups, e.g. ``('Dense_9/(.*)', r'Dense_1/\\1')``.
      A third element overrides ``on_shape_mismatch`` for that rule. Each
      rule must match a selected param.
    on_shape_mismatch: ``'error'`` (list every mismatch), ``'skip'`` (keep
      the fresh value) or ``'overlap'`` (copy ``[:min]`` on each axis).
    on_dtype_mismatch: ``'error'`` or ``'cast'`` (to the target's dtype).
    head: The layer whose last axis is classes; ``None`` or ``''``: no layer
      is copied by label.
    class_map: Target digit -> donor digit for the head rows (digit-string
      keys are accepted, as configs need). Without recorded labels, digits
      are row indices.
    opt_state: ``'fresh'`` (keep the fresh slots) or ``'donor'`` (carry the
      donor's slots of copied params, transformed like the params: same rows,
      same slices). Scalar optimizer leaves are not slots: see ``step``.
    step: ``'reset'`` (keep the fresh step) or ``'donor'`` (take ``step`` and
      the scalar ``.../count`` leaves of the optimizer state, e.g. schedule
      counts, from the donor where it has the same key).

  Returns:
    The hook function.

  Raises:
    DonorError: If ``donor`` cannot be opened.
    ValueError: If a parameter is malformed (when the hook runs: for any
      mismatch between donor and target, listed in full).
  """
  _choice('on_shape_mismatch', on_shape_mismatch, _SHAPE_POLICIES)
  _choice('on_dtype_mismatch', on_dtype_mismatch, _DTYPE_POLICIES)
  _choice('opt_state', opt_state, _OPT_STATE)
  _choice('step', step, _STEP)
  rules = _rules(rename, on_shape_mismatch)
  for name, patterns in (('include', include), ('exclude', exclude)):
    if isinstance(patterns, str):
      raise ValueError(
          f'warm_start: {name} must be a list of regexes, got the string '
          f'{patterns!r}; write [{patterns!r}].'
      )
    validation.match_keys(patterns, [], allow_empty=True)
  class_map = _class_map(class_map)
  reader = donors.open_donor(donor)

  def hook_fn(flat: dict, ctx: api.Context) -> dict:
    plan = _Plan(flat, ctx, reader)
    plan.select(include, exclude, rules, on_shape_mismatch)
    plan.params(head or None, class_map, on_dtype_mismatch)
    if opt_state == 'donor':
      plan.slots(on_dtype_mismatch)
    if step == 'donor':
      plan.step_and_counts()
    plan.raise_errors()
    return plan.apply()

  hook_fn.__name__ = 'warm_start'  # Names it in HookError when passed built.
  hook_fn.donor = reader
  return hook_fn


class _Plan:
  """What one warm start copies; collects every error before raising."""

  def __init__(self, flat: dict, ctx: api.Context, reader: Any) -> None:
    self.flat = flat
    self.ctx = ctx
    self.reader = reader
    self.donor = reader.structure()
    self.prefix = _param_prefix(self.donor)
    # Target param key -> (donor param key, shape policy).
    self.selected: dict[str, tuple[str, str]] = {}
    # Target key -> (donor key, transfer); params, slots, step and counts.
    self.copies: dict[str, tuple[str, transfer.Transfer]] = {}
    self.param_transfers: dict[str, tuple[str, transfer.Transfer]] = {}
    self.shape_errors: list[str] = []
    self.dtype_errors: list[str] = []
    self.errors: list[str] = []

  def _where(self) -> str:
    return f'donor {self.reader.path!r}'

  def select(self, include, exclude, rules, default_policy: str) -> None:
    """Picks target params and their donor keys."""
    paths = [k[len(_PARAMS):] for k in self.flat if k.startswith(_PARAMS)]
    chosen = validation.match_keys(include, paths)
    dropped = validation.match_keys(exclude, paths)
    chosen = [p for p in chosen if p not in dropped]
    used = [False] * len(rules)
    missing = []
    for path in chosen:
      donor_path, policy = path, default_policy
      for i, (regex, template, rule_policy) in enumerate(rules):
        match = regex.fullmatch(path)
        if match:
          used[i] = True
          donor_path, policy = match.expand(template), rule_policy
          break
      donor_key = self.prefix + donor_path
      if donor_key not in self.donor:
        missing.append((path, donor_key))
        continue
      self.selected[_PARAMS + path] = (donor_key, policy)
    for (regex, template, _), was_used in zip(rules, used):
      if not was_used:
        self.errors.append(
            f'rename rule ({regex.pattern!r}, {template!r}) matches none of '
            f'the {len(chosen)} selected params {chosen[:5]}; rules match '
            'whole target param paths (re.fullmatch).'
        )
    if missing:
      donor_params = [k for k in self.donor if k.startswith(self.prefix)]
      lines = []
      for path, key in missing:
        close = difflib.get_close_matches(key, donor_params, n=3, cutoff=0.5)
        lines.append(f'  {path} <- {key}' + (f'  (did you mean {close}?)' if close else ''))
      self.errors.append(
          f'{self._where()} lacks {len(missing)} key(s) for selected params:\n'
          + '\n'.join(lines)
          + '\n  Fix: narrow include/exclude or add rename rules.'
      )

  def _labels(self, key: str, donor_key: str, class_map) -> tuple | None:
    """(target rows, donor rows) of the head, or None after an error."""
    t_rows = _shape(self.flat[key])[-1:] or (0,)
    d_rows = tuple(self.donor[donor_key].shape)[-1:] or (0,)
    target = tuple(self.ctx.classes) or None
    donor = self.reader.classes
    for what, labels, rows in (('target', target, t_rows[0]), ('donor', donor, d_rows[0])):
      if labels is not None and len(labels) != rows:
        self.errors.append(
            f'The {what} records {len(labels)} classes {list(labels)} but '
            f'{key if what == "target" else donor_key} has {rows} rows on its '
            'last (class) axis.'
        )
        return None
    if class_map is None:
      if donor is None:
        self.errors.append(
            f'{self._where()} records no classes, so head {key} cannot be '
            'copied by digit label. Pass class_map={target digit: donor '
            'digit} (row indices for a donor without labels), or exclude the '
            'head, or set head=None to copy it as is.'
        )
        return None
      if target is None:
        self.errors.append(
            'The target has no class labels (ctx.classes is empty), so head '
            f'{key} cannot be copied by digit label; pass class_map.'
        )
        return None
      return transfer.class_rows(target, donor)
    target = target or tuple(range(t_rows[0]))
    donor = donor or tuple(range(d_rows[0]))
    bad_t = [t for t in class_map if t not in target]
    bad_d = [d for d in class_map.values() if d not in donor]
    if bad_t or bad_d:
      parts = []
      if bad_t:
        parts.append(f'target digit(s) {bad_t} not in the target classes {list(target)}')
      if bad_d:
        parts.append(f'donor digit(s) {bad_d} not in the donor classes {list(donor)}')
      self.errors.append(f'class_map {class_map}: ' + '; '.join(parts) + '.')
      return None
    return transfer.class_rows(target, donor, class_map)

  def _check_dtype(self, key: str, donor_key: str, policy: str) -> None:
    t, d = _dtype(self.flat[key]), np.dtype(self.donor[donor_key].dtype)
    if t != d and policy == 'error':
      self.dtype_errors.append(f'  {key}: target {t.name}, donor {donor_key} {d.name}')

  def params(self, head: str | None, class_map, dtype_policy: str) -> None:
    """Plans the transfer of each selected param."""
    rows: Any = _UNSET
    for key, (donor_key, policy) in self.selected.items():
      t_shape = _shape(self.flat[key])
      d_shape = tuple(self.donor[donor_key].shape)
      is_head = head is not None and key.startswith(f'{_PARAMS}{head}/')
      if is_head:
        if rows is _UNSET:
          rows = self._labels(key, donor_key, class_map)
        if rows is None:
          continue
        plan = transfer.plan(t_shape, d_shape, class_axis=rows, overlap=policy == 'overlap')
      else:
        plan = transfer.plan(t_shape, d_shape, overlap=policy == 'overlap')
      if plan is None:
        if policy == 'skip':
          logging.info('warm_start: skipping %s: target %s, donor %s %s.',
                       key, t_shape, donor_key, d_shape)
          continue
        reason = ' (ranks differ: cannot overlap)' if policy == 'overlap' else ''
        self.shape_errors.append(
            f'  {key}: target {t_shape}, donor {donor_key} {d_shape}{reason}'
        )
        continue
      if plan.is_empty:
        logging.info('warm_start: %s shares no class with the donor; it '
                     'keeps its fresh value.', key)
        continue
      self._check_dtype(key, donor_key, dtype_policy)
      self.param_transfers[key] = (donor_key, plan)
      self.copies[key] = (donor_key, plan)

  def slots(self, dtype_policy: str) -> None:
    """Plans the donor slots of every copied param (opt_state='donor')."""
    if self.prefix != _PARAMS:
      self.errors.append(
          f"opt_state='donor' needs a donor TrainState with params/ and "
          f'opt_state/ keys; {self._where()} has none. Use '
          "opt_state='fresh'."
      )
      return
    target_index = flat_lib.slot_index(self.flat)
    donor_index = flat_lib.slot_index(self.donor)
    missing = []
    for key, (donor_key, plan) in self.param_transfers.items():
      donor_slots = _slots_by_kind(donor_index.get(donor_key, ()), donor_key)
      for kind, slot in _slots_by_kind(target_index[key], key).items():
        if kind not in donor_slots:
          missing.append(f'  {slot} (donor has {sorted(donor_slots.values()) or "no slots"} '
                         f'for {donor_key})')
          continue
        self._check_dtype(slot, donor_slots[kind], dtype_policy)
        self.copies[slot] = (donor_slots[kind], plan)
    if missing:
      self.errors.append(
          f"opt_state='donor': {self._where()} lacks the slots of "
          f'{len(missing)} target slot(s):\n' + '\n'.join(missing) +
          "\n  Fix: use opt_state='fresh' or exclude these params."
      )

  def step_and_counts(self) -> None:
    """Plans ``step`` and scalar optimizer counts (step='donor')."""
    if 'step' not in self.donor or 'step' not in self.flat:
      self.errors.append(
          f"step='donor' needs a 'step' key in the donor and the target; "
          f"{self._where()} has {'step' in self.donor}, the target "
          f"{'step' in self.flat}. Use step='reset'."
      )
      return
    donor_counts = {
        _PARTITION.sub('', k): k for k, v in self.donor.items()
        if _is_scalar_count(k, v)
    }
    for key, leaf in self.flat.items():
      if key == 'step':
        donor_key = 'step'
      elif _is_scalar_count(key, leaf) and _PARTITION.sub('', key) in donor_counts:
        donor_key = donor_counts[_PARTITION.sub('', key)]
      else:
        continue
      if tuple(self.donor[donor_key].shape) != ():
        self.shape_errors.append(
            f'  {key}: target (), donor {donor_key} {tuple(self.donor[donor_key].shape)}'
        )
        continue
      self.copies[key] = (donor_key, transfer.plan((), ()))

  def raise_errors(self) -> None:
    """Raises one ValueError listing every problem found."""
    errors = list(self.errors)
    if self.shape_errors:
      errors.append(
          f'{len(self.shape_errors)} shape mismatch(es) with {self._where()} '
          "(on_shape_mismatch='error'):\n" + '\n'.join(self.shape_errors) +
          "\n  Fix: exclude these params, rename them to the right donor "
          "keys, or set on_shape_mismatch='skip' or 'overlap'."
      )
    if self.dtype_errors:
      errors.append(
          f'{len(self.dtype_errors)} dtype mismatch(es) with {self._where()} '
          "(on_dtype_mismatch='error'):\n" + '\n'.join(self.dtype_errors) +
          "\n  Fix: set on_dtype_mismatch='cast'."
      )
    if errors:
      raise ValueError('warm_start: ' + '\n'.join(errors))

  def apply(self) -> dict:
    """Reads what is needed (nothing in plan mode) and copies it.

    Donor tensors are read a group at a time (up to ``_READ_BYTES``, or one
    tensor) and each group is placed before the next is read: the host holds
    one group, not the whole selection. Device leaves are computed on their
    devices (``transfer.apply_on_device``): no device value goes to the host.
    """
    out = dict(self.flat)
    targets: dict[str, list[tuple[str, transfer.Transfer]]] = {}
    for key, (donor_key, plan) in self.copies.items():
      targets.setdefault(donor_key, []).append((key, plan))
      self.ctx.report.record(key, 'copied', source=donor_key)
      if plan.target_shape != plan.source_shape:
        self.ctx.report.record(
            key, 'resized', from_shape=plan.source_shape, shape=plan.target_shape
        )
    if not self.ctx.abstract:
      for group in _read_groups(sorted(targets), self.donor):
        values = self.reader.read(group)
        placed = _transferred(
            (key, self.flat[key], plan, values[donor_key])
            for donor_key in group for key, plan in targets[donor_key])
        # Host buffers are released only when their copies are done.
        jax.block_until_ready(placed)
        out.update(placed)
        del values, placed
    logging.info('warm_start: copied %d leaves from %s.', len(self.copies), self.reader.path)
    return out


# Host memory a warm start may hold at once for donor tensors being placed.
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
    if not transfer.on_device(leaf, plan.target_shape):
      out[key] = transfer.place(plan.apply(leaf, value, _dtype(leaf)), leaf)
    elif plan.is_copy and not isinstance(value, jax.Array):
      batch_keys.append(key)
      batch_values.append(np.asarray(value, dtype=leaf.dtype))
      batch_shardings.append(leaf.sharding)
    else:
      out[key] = plan.apply_on_device(leaf, value, leaf)
  if batch_keys:
    out.update(zip(batch_keys, jax.device_put(batch_values, batch_shardings)))
  return out
