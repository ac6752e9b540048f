"""Hook ``map_labels``: relabel an axis of some layers, slots alike.

Entries of a labelled axis (a head's classes, an embedding's tokens) keep
their values by label, in the params, in every other collection of the
layer (``batch_stats/``, ...) and in the params' optimizer slots; labels the
state lacks get fresh entries and fresh slots; labels the target lacks go.
``resize_head`` is this on a head's last axis.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hooks import api
from hooks import counts
from hooks import flat as flat_lib
from hooks import labels as labels_lib
from hooks import pairing
from hooks import registry
from hooks import select
from hooks import transfer

__all__ = ['map_labels', 'relabel']

INITS = ('init', 'zeros', 'mean')


def _plans(flat: Mapping[str, Any], ctx: api.Context,
           spec: labels_lib.LabelSpec, init: str, hook: str
           ) -> dict[str, tuple[transfer.Transfer, str, bool, bool]]:
  """Key -> (transfer, description, whether labels moved, whether some are
  new) of the matched keys."""
  paths = {k: select.split(k)[1] for k in select.model_keys(flat)}
  keys = [k for k, p in paths.items()
          if re.fullmatch(spec.layers, labels_lib.layer_of(p))]
  if not keys:
    labels_lib.check_layers([spec], paths.values(), hook=hook)
  plans = {}
  for key in keys:
    shape = tuple(np.shape(flat[key]))
    if key not in ctx.expected:
      raise ValueError(f'{hook}: {key} is not in the target structure.')
    target_shape = tuple(ctx.expected[key].shape)
    try:
      index, detail = pairing.axis_index(spec, target_shape, shape, key=key,
                                         source='incoming', new=init)
    except ValueError as e:
      raise ValueError(f'{hook}: {e}') from e
    plan = transfer.plan(target_shape, shape, labelled=index)
    if plan is None:
      raise ValueError(
          f'{hook}: {key} is {shape} and the target {target_shape}; only '
          f'the labelled axis {spec.axis} may change.')
    t_index, s_index = index[spec.axis]
    new = len(t_index) != target_shape[spec.axis]
    moved = new or target_shape != shape or t_index != s_index
    plans[key] = (plan, detail, moved, new)
  return plans


def _new_entries(leaf: Any, key: str, axis: int, plan: transfer.Transfer,
                 fresh: Mapping[str, Any], init: str, hook: str) -> Any:
  """What entries without an incoming label start from."""
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return None
  if init == 'zeros':
    return 0
  if init == 'mean':
    if isinstance(leaf, jax.Array):
      return jnp.mean(leaf, axis=axis, keepdims=True)
    return np.mean(transfer.to_numpy(leaf), axis=axis, keepdims=True)
  value = fresh.get(key)
  if value is None or tuple(np.shape(value)) != plan.target_shape:
    raise ValueError(
        f"{hook}: init='init' needs the fresh target's {plan.target_shape} "
        f'value of {key}; ctx.fresh() does not have it.')
  return value


def _apply(out: dict, key: str, plan: transfer.Transfer, base: Any) -> None:
  leaf = out[key]
  if isinstance(leaf, jax.ShapeDtypeStruct):
    out[key] = jax.ShapeDtypeStruct(plan.target_shape, leaf.dtype)
  elif transfer.on_device(leaf, plan.target_shape):
    out[key] = plan.apply_on_device(base, leaf, leaf)  # No host copy.
  else:
    source = transfer.to_numpy(leaf)
    out[key] = transfer.place(plan.apply(base, source, source.dtype), leaf)


def relabel(spec: labels_lib.LabelSpec, init: str, *, hook: str
            ) -> api.HookFn:
  """The hook of ``map_labels`` for a checked spec (``resize_head`` too)."""
  select.choice(hook, 'init', init, INITS)

  def hook_fn(flat: dict, ctx: api.Context) -> dict:
    plans = _plans(flat, ctx, spec, init, hook)
    if not any(moved for _, _, moved, _ in plans.values()):
      return dict(flat)  # The same labels in the same places.
    slots = flat_lib.slot_index(flat)
    needs_fresh = not ctx.abstract and any(
        new and (init == 'init' or slots.get(k))
        for k, (_, _, _, new) in plans.items())
    fresh = ctx.fresh() if needs_fresh else {}
    out = dict(flat)
    for key, (plan, detail, moved, new) in plans.items():
      if not moved:
        continue
      base = (_new_entries(flat[key], key, spec.axis, plan, fresh, init, hook)
              if new else 0)  # Every entry is incoming: no base shows.
      for target in (key, *slots.get(key, ())):
        moves = plan
        if target != key and counts.is_count(
            flat_lib.split_slot(target, key)):
          base = 0  # New entries' count (fresh); it grows the edited axis.
          moves = counts.plan(plan, np.shape(flat[target]))
        elif target != key and new:  # Fresh slots: tx.init's zeros.
          base = fresh.get(target)
          if base is None or tuple(np.shape(base)) != plan.target_shape:
            base = 0
        _apply(out, target, moves, base)
        if moves.target_shape != moves.source_shape:
          ctx.report.record(target, 'resized', from_shape=moves.source_shape,
                            shape=moves.target_shape, detail=detail)
        else:
          ctx.report.record(target, 'relabelled', detail=detail)
    return out

  hook_fn.__name__ = hook
  return hook_fn


@registry.register('map_labels')
def map_labels(
    layers: str,
    from_labels: Sequence[Any] | None,
    to_labels: Sequence[Any] | None,
    axis: int = -1,
    label_map: Mapping[Any, Any] | None = None,
    init: str = 'init',
) -> api.HookFn:
  """Relabels an axis of the matched layers, in the state as it is.

  Use it after init (post_init) or on a checkpoint being restored
  (pre_restore). Every key of a matched layer, in every collection, is
  relabelled; the target shapes come from ``ctx.expected``. Kept labels
  keep their entries and their slots bit for bit; new labels get ``init``
  entries and fresh slots (``ctx.fresh()``'s: zeros and, with
  ``hooks.optim``, count 0, its count growing along ``axis``: a (1, 10)
  count for a head's ten columns); dropped labels go.

  Args:
    layers: Regex over layer paths (``re.fullmatch``), e.g. ``'head'``,
      ``'Embed_0'``.
    from_labels: The label of each incoming entry (None: its index).
    to_labels: The label of each target entry (None: its index).
    axis: The labelled axis: -1 for a kernel's columns, 0 for an
      embedding's rows.
    label_map: Target label -> incoming label, instead of equal labels.
    init: New entries: ``'init'`` (the target's initializer, from
      ``ctx.fresh()``), ``'zeros'`` or ``'mean'`` (of the incoming ones).

  Returns:
    The hook function.

  Raises:
    ValueError: If a parameter is malformed (no I/O here); when the hook
      runs, if the layers match nothing (with the layers there are) or the
      labels do not fit the shapes.
  """
  spec = labels_lib.spec(layers, axis, from_labels, to_labels, label_map,
                         hook='map_labels', names=('from_labels', 'to_labels'))
  return relabel(spec, init, hook='map_labels')
