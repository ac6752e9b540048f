"""Hook ``migrate_flax_optim``: a legacy ``flax.optim`` checkpoint to optax.

Before Flax removed ``flax.optim``, ``save_checkpoint(target=optimizer)``
wrote ``{'target': params, 'state': {'step': n, 'param_states': {<param
path>: {<slot>: array}}}}``. Flattened, that is ``target/<p>``,
``state/step`` and ``state/param_states/<p>/<slot>``. The optax equivalents:

============================  ===================================
flax.optim                    optax state (flat key ends with)
============================  ===================================
Adam ``grad_ema``             ``.../mu/<p>``
Adam ``grad_sq_ema``          ``.../nu/<p>``
Momentum ``momentum``         ``.../trace/<p>``
``state/step``                ``step``; each ``.../count/<p>``
                              (``hooks.optim``); every scalar
                              ``.../count`` (optax's Adam count,
                              ``inject_hyperparams`` and schedule counts)
============================  ===================================
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from hooks import api
from hooks import flat as flat_lib
from hooks import registry

_TARGET = 'target/'
_PARAM_STATES = 'state/param_states/'
_STEP = 'state/step'
_PARAMS = 'params/'

# Optax slot name (last part of the slot's optimizer path) -> legacy slot.
SLOTS = {'mu': 'grad_ema', 'nu': 'grad_sq_ema', 'trace': 'momentum'}
_STEP_SLOTS = ('count',)  # Per-tensor step counts (hooks.optim).


def _shape(leaf: Any) -> tuple[int, ...]:
  return tuple(np.shape(leaf))


def _value(leaf_in: Any, expected: jax.ShapeDtypeStruct, abstract: bool) -> Any:
  """The legacy leaf with the expected dtype (its own shape)."""
  if abstract:
    return jax.ShapeDtypeStruct(_shape(leaf_in), expected.dtype)
  return np.asarray(leaf_in).astype(expected.dtype)


def _full(shape: tuple[int, ...], value: Any, dtype: Any, abstract: bool) -> Any:
  if abstract:
    return jax.ShapeDtypeStruct(shape, dtype)
  return np.full(shape, np.asarray(value), dtype=dtype)


def _check_layout(flat: Mapping[str, Any]) -> None:
  params = [k for k in flat if k.startswith(_TARGET)]
  other = [
      k for k in flat
      if not (k.startswith(_TARGET) or k.startswith(_PARAM_STATES) or k == _STEP)
  ]
  if not params or _STEP not in flat or other:
    found = ', '.join(list(flat)[:5]) + (', ...' if len(flat) > 5 else '')
    extra = f' Keys outside that layout: {other[:5]}.' if other else ''
    raise ValueError(
        'migrate_flax_optim: the input is not a legacy flax.optim checkpoint: '
        "expected keys 'target/<param>', 'state/step' and "
        f"'state/param_states/<param>/<slot>', got {found or 'no keys'}."
        f'{extra} Run this hook first in pre_restore, on the raw checkpoint.'
    )


@registry.register('migrate_flax_optim')
def migrate_flax_optim() -> api.HookFn:
  """Turns a raw legacy ``flax.optim`` checkpoint into the target's flat state.

  Params come from ``target/`` with their stored shapes (a later hook such
  as ``resize_head`` may change them), each optimizer slot of the target
  (``ctx.expected``) from the legacy slot of its param (see the module
  table), every count from ``state/step``, and the remaining leaves (e.g.
  ``hyperparams/learning_rate``) from ``ctx.fresh()``. Use it in pre_restore.

  Returns:
    The hook function.

  Raises:
    ValueError (when the hook runs): if the input is not in the legacy
      layout, or the legacy checkpoint lacks params or slots the target needs
      or has slots of the wrong shape (all of them are listed).
  """

  def hook_fn(flat: dict, ctx: api.Context) -> dict:
    _check_layout(flat)
    expected = ctx.expected
    abstract = ctx.abstract
    step = flat[_STEP]
    target_slots = flat_lib.slot_index(expected)
    legacy_params = [k[len(_TARGET):] for k in flat if k.startswith(_TARGET)]
    missing, wrong, unknown = [], [], []
    out: dict[str, Any] = {}
    sources: dict[str, str] = {}
    slot_keys = {s for slots in target_slots.values() for s in slots}
    fresh_keys = []

    for key, struct in expected.items():
      if key == 'step':
        out[key] = _full((), step, struct.dtype, abstract)
        sources[key] = _STEP
      elif key.startswith(_PARAMS):
        path = key[len(_PARAMS):]
        if _TARGET + path not in flat:
          close = difflib.get_close_matches(
              _TARGET + path, [_TARGET + p for p in legacy_params], n=3, cutoff=0.5
          )
          missing.append(
              f'  param {_TARGET}{path}' + (f'  (did you mean {close}?)' if close else '')
          )
          continue
        out[key] = _value(flat[_TARGET + path], struct, abstract)
        sources[key] = _TARGET + path
      elif key in slot_keys:
        continue  # Below, once the params are known.
      elif key.rsplit('/', 1)[-1] == 'count' and _shape(struct) == ():
        out[key] = _full((), step, struct.dtype, abstract)
        sources[key] = _STEP
      else:
        fresh_keys.append(key)

    for param_key, slots in target_slots.items():
      path = param_key[len(_PARAMS):]
      if param_key not in out:
        continue  # Reported as a missing param.
      shape = _shape(out[param_key])
      for slot in slots:
        name = flat_lib.split_slot(slot, param_key).rsplit('/', 1)[-1]
        struct = expected[slot]
        if name in _STEP_SLOTS:  # The target's count shape (per tensor).
          out[slot] = _full(_shape(struct), step, struct.dtype, abstract)
          sources[slot] = _STEP
          continue
        if name not in SLOTS:
          unknown.append(f'  {slot} (optax slot {name!r})')
          continue
        source = f'{_PARAM_STATES}{path}/{SLOTS[name]}'
        if source not in flat:
          have = sorted(
              k.rsplit('/', 1)[-1] for k in flat
              if k.startswith(f'{_PARAM_STATES}{path}/')
          )
          missing.append(f'  slot {source} for {slot} (legacy slots of {path}: {have})')
          continue
        if _shape(flat[source]) != shape:
          wrong.append(
              f'  {source}: {_shape(flat[source])}, but its param {_TARGET}{path} is {shape}'
          )
          continue
        out[slot] = _value(flat[source], struct, abstract)
        sources[slot] = source

    target_params = {k[len(_PARAMS):] for k in expected if k.startswith(_PARAMS)}
    extra = sorted(set(legacy_params) - target_params)
    problems = []
    if missing:
      problems.append(
          f'{len(missing)} missing from the legacy checkpoint:\n'
          + '\n'.join(missing)
      )
    if wrong:
      problems.append(f'{len(wrong)} slot(s) of the wrong shape:\n' + '\n'.join(wrong))
    if unknown:
      problems.append(
          f'{len(unknown)} target slot(s) with no flax.optim equivalent (known: '
          f'{sorted(SLOTS) + list(_STEP_SLOTS)}):\n' + '\n'.join(unknown)
      )
    if extra:
      problems.append(
          f'{len(extra)} legacy param(s) the target does not have: {extra}; '
          'rename or drop them in the model, or migrate into a model that has them.'
      )
    if problems:
      raise ValueError(
          'migrate_flax_optim: the legacy checkpoint does not fit the target '
          'optimizer state.\n' + '\n'.join(problems)
      )

    if fresh_keys:
      fresh = ctx.fresh()
      for key in fresh_keys:
        out[key] = fresh[key]
    result = {key: out[key] for key in expected}
    for key, source in sources.items():
      ctx.report.record(key, 'migrated', source=source)
    for key in fresh_keys:
      ctx.report.record(key, 'reset')
    return result

  return hook_fn
