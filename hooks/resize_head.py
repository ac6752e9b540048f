"""Hook ``resize_head``: change the class count of the head, row by digit."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from hooks import api
from hooks import flat as flat_lib
from hooks import registry
from hooks import transfer

_INITS = ('zeros', 'init', 'mean')
_PARAMS = 'params/'


def _digits(name: str, classes: Any) -> tuple[int, ...]:
  if isinstance(classes, str) or not isinstance(classes, Sequence):
    raise ValueError(
        f'resize_head: {name} {classes!r} must be a list of digit labels, '
        'e.g. [0, 1, 2, 3, 4].'
    )
  digits = []
  for c in classes:
    if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
      raise ValueError(f'resize_head: {name} {list(classes)} holds {c!r}, not an integer.')
    digits.append(int(c))
  repeated = sorted({c for c in digits if digits.count(c) > 1})
  if repeated:
    raise ValueError(
        f'resize_head: {name} {digits} repeats digit(s) {repeated}; each '
        'head row is one class.'
    )
  return tuple(digits)


@registry.register('resize_head')
def resize_head(
    layer: str = 'Dense_1',
    from_classes: Sequence[int] | None = None,
    init: str = 'init',
) -> api.HookFn:
  """Changes the head's class count, keeping each kept class's row by label.

  Every param of ``layer`` has the classes on its last axis (a Dense kernel
  ``(features, k)`` and bias ``(k,)``). Row ``i`` of the result belongs to
  digit ``ctx.classes[i]`` and takes the incoming row of that digit, in the
  params and in every optimizer slot (same rows). Digits the incoming head
  lacks get new rows (``init``) and fresh slots (``tx.init``'s values, i.e.
  zeros and, with ``hooks.optim``, count 0: no bias-correction kick); digits
  the target lacks are dropped. The target shapes come from ``ctx.expected``.
  Use it after init (post_init) or on a checkpoint being restored
  (pre_restore).

  Args:
    layer: The head layer's path under ``params/``.
    from_classes: The digit of each incoming head row; default
      ``ctx.donor.classes`` (in pre_restore: the checkpoint being restored).
    init: New rows: ``'zeros'``, ``'init'`` (the layer's own initializer,
      from ``ctx.fresh()``) or ``'mean'`` (the mean of the incoming rows).

  Returns:
    The hook function.

  Raises:
    ValueError: If ``init`` is unknown or ``from_classes`` is malformed;
      when the hook runs, if the incoming classes are unknown, do not match
      the incoming head, or the layer is missing.
  """
  if init not in _INITS:
    raise ValueError(f'resize_head: init={init!r} is not one of {list(_INITS)}.')
  if from_classes is not None:
    from_classes = _digits('from_classes', from_classes)

  def hook_fn(flat: dict, ctx: api.Context) -> dict:
    incoming = from_classes
    if incoming is None:
      donor_classes = ctx.donor.classes if ctx.donor is not None else None
      if donor_classes is None:
        raise ValueError(
            'resize_head: the incoming head\'s classes are unknown: pass '
            'from_classes=[...] (the digit of each incoming row); '
            + ('ctx.donor is None.' if ctx.donor is None else
               f'the checkpoint {ctx.donor.path!r} records no classes.')
        )
      incoming = _digits('ctx.donor.classes', donor_classes)
    target = _digits('ctx.classes', ctx.classes)
    if not target:
      raise ValueError(
          'resize_head: the target classes (ctx.classes) are empty; the '
          'context must give the digit of each target head row.'
      )
    prefix = f'{_PARAMS}{layer}/'
    keys = [k for k in flat if k.startswith(prefix)]
    if not keys:
      layers = sorted({k.split('/')[1] for k in flat if k.startswith(_PARAMS)})
      close = difflib.get_close_matches(layer, layers, n=1)
      hint = f' Did you mean {close[0]!r}?' if close else ''
      raise ValueError(
          f'resize_head: no params under {prefix!r}.{hint} Layers: {layers}.'
      )
    plans = {}
    for key in keys:
      shape = tuple(np.shape(flat[key]))
      if not shape or shape[-1] != len(incoming):
        raise ValueError(
            f'resize_head: from_classes {list(incoming)} names '
            f'{len(incoming)} classes but {key} has shape {shape}: its last '
            'axis must have one row per class.'
        )
      if key not in ctx.expected:
        raise ValueError(f'resize_head: {key} is not in the target structure.')
      target_shape = tuple(ctx.expected[key].shape)
      if not target_shape or target_shape[-1] != len(target):
        raise ValueError(
            f'resize_head: the target classes {list(target)} are '
            f'{len(target)} but the target {key} has shape {target_shape}.'
        )
      if target_shape[:-1] != shape[:-1]:
        raise ValueError(
            f'resize_head: {key} is {shape} and the target {target_shape}; '
            'only the last (class) axis may change.'
        )
      rows = transfer.class_rows(target, incoming)
      plans[key] = transfer.plan(target_shape, shape, class_axis=rows)
    if incoming == target:
      return dict(flat)  # Same rows in the same order: nothing to do.

    out = dict(flat)
    fresh = ctx.fresh() if not ctx.abstract else {}
    slots = flat_lib.slot_index(flat)
    for key, plan in plans.items():
      _resize(out, key, plan, _new_rows(flat[key], plan, fresh.get(key), init), ctx)
      for slot in slots.get(key, ()):
        base = fresh.get(slot)
        if base is None or tuple(np.shape(base)) != plan.target_shape:
          base = 0  # Fresh slots of the usual optimizers are zeros.
        _resize(out, slot, plan, base, ctx)
    return out

  return hook_fn


def _new_rows(leaf: Any, plan: transfer.Transfer, fresh: Any, init: str) -> Any:
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return None
  if init == 'zeros':
    return 0
  if init == 'mean':
    return np.mean(transfer.to_numpy(leaf), axis=-1, keepdims=True)
  if fresh is None or tuple(np.shape(fresh)) != plan.target_shape:
    raise ValueError(
        f"resize_head: init='init' needs the fresh target's {plan.target_shape} "
        'value of the head; ctx.fresh() does not have it.'
    )
  return fresh


def _resize(
    out: dict, key: str, plan: transfer.Transfer, base: Any, ctx: api.Context
) -> None:
  leaf = out[key]
  if isinstance(leaf, jax.ShapeDtypeStruct):
    out[key] = jax.ShapeDtypeStruct(plan.target_shape, leaf.dtype)
  elif transfer.on_device(leaf, plan.target_shape):
    out[key] = plan.apply_on_device(base, leaf, leaf)  # No host copy.
  else:
    source = transfer.to_numpy(leaf)
    value = plan.apply(base, source, source.dtype)
    out[key] = transfer.place(value, leaf)
  ctx.report.record(key, 'resized', from_shape=plan.source_shape, shape=plan.target_shape)
