"""Freezing params through the optimizer.

Frozen params get ``optax.set_to_zero()`` updates and no optimizer slots:
``freeze`` wraps the optimizer in ``optax.partition`` with labels
``'trainable'`` and ``'frozen'``. Their gradients are then unused, and XLA
drops the work that computes them; a loss function that passes its params
through ``stop_frozen_gradients`` does not differentiate frozen layers at all
(plain inference, which XLA compiles tighter). When the frozen set changes,
the new optimizer state is built fresh and every slot that still exists is
carried over by key (``carry_opt_state``); ``freeze_state`` does both.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax

from hooks import counts
from hooks import flat as flat_lib
from hooks import nnx_freeze
from hooks import nnx_state
from hooks import validation
from hooks.runner import gc_paused

__all__ = [
    'FROZEN',
    'TRAINABLE',
    'FreezeSchedule',
    'FrozenTransformation',
    'carry_opt_state',
    'freeze',
    'freeze_labels',
    'freeze_state',
    'stop_frozen_gradients',
]

TRAINABLE = 'trainable'
FROZEN = 'frozen'

# The path optax.partition puts above a partition's state: the part of a slot
# key that changes when a param moves between our two partitions.
_PARTITION = re.compile(
    rf'(?:^|(?<=/))inner_states/(?:{TRAINABLE}|{FROZEN})/inner_state/'
)
_OPT_STATE = 'opt_state/'


def freeze_labels(params: Any, patterns: Sequence[str]) -> Any:
  """Labels each param ``'frozen'`` or ``'trainable'``.

  Args:
    params: The params pytree (concrete or abstract).
    patterns: Regexes over param paths (``'Conv_0/.*'``), ``re.fullmatch``.

  Returns:
    A pytree like ``params`` with a label at each leaf.

  Raises:
    ValueError: If a pattern is invalid or matches no param, or if every
      param would be frozen.
  """
  flat, rebuild = flat_lib.flatten_with_rebuild(params)  # One flatten.
  frozen = validation.match_keys(patterns, flat)
  if len(frozen) == len(flat):
    raise ValueError(
        f'Freeze patterns {list(patterns)} match all {len(flat)} params: '
        'nothing left to train. Narrow the patterns or drop this phase.'
    )
  return rebuild({path: FROZEN if path in frozen else TRAINABLE
                  for path in flat})


class FrozenTransformation(optax.GradientTransformationExtraArgs):
  """What ``freeze`` returns: ``optax.partition``'s ``init`` and ``update``,
  the labels it partitions the params by, and the optimizer it wraps.

  Attributes:
    labels: A pytree like the params: ``'frozen'`` or ``'trainable'``.
    base: The optimizer of the trainable params (``freeze``'s ``tx``).
  """

  # A NamedTuple subclass without __slots__: instances can carry attributes.
  def __new__(cls, init: Any, update: Any, labels: Any,
              base: optax.GradientTransformation) -> FrozenTransformation:
    self = super().__new__(cls, init, update)
    self.labels = labels
    self.base = base
    return self

  def __getnewargs__(self) -> tuple[Any, Any, Any, Any]:
    return self.init, self.update, self.labels, self.base


def stop_frozen_gradients(params: Any, tx: Any) -> Any:
  """Takes the frozen params of ``freeze``'s optimizer out of differentiation.

  Use it inside a loss function, on the params being differentiated. JAX
  then computes no tangents for frozen layers: they run as plain inference,
  which XLA compiles like an eval step (with a ReLU whose JVP rule differs
  from its plain form, the seed CNN's frozen-convs step on a CPU runs about
  1.4x faster). Their gradients come out as zeros, which
  the ``set_to_zero`` partition discards anyway: the updates are the same.

  Args:
    params: The params pytree (or tracers of it).
    tx: The optimizer; anything but a ``FrozenTransformation`` leaves
      ``params`` as they are.

  Returns:
    ``params``, with ``jax.lax.stop_gradient`` on every frozen leaf.
  """
  if not isinstance(tx, FrozenTransformation):
    return params
  return jax.tree.map(
      lambda p, label: jax.lax.stop_gradient(p) if label == FROZEN else p,
      params,
      tx.labels,
  )


@gc_paused()  # Labels for every param: a collection would walk them all.
def freeze(
    tx: optax.GradientTransformation,
    params: Any,
    patterns: Sequence[str],
) -> optax.GradientTransformation:
  """Wraps ``tx`` so that params matching ``patterns`` do not change.

  Args:
    tx: The optimizer for the trainable params.
    params: The params pytree (concrete or abstract), for the labels.
    patterns: Regexes over param paths without ``params/``, e.g.
      ``['Conv_.*', 'Dense_0/.*']``. Empty: nothing is frozen.

  Returns:
    ``tx`` itself when ``patterns`` is empty, else
    ``optax.partition({'trainable': tx, 'frozen': set_to_zero()}, labels)``
    as a ``FrozenTransformation`` (which knows ``labels`` and ``tx``). A
    ``FrozenTransformation`` given as ``tx`` is unwrapped first. Slot keys
    then read
    ``opt_state/inner_states/trainable/inner_state/0/mu/Dense_1/kernel``.

  Raises:
    ValueError: If a pattern is invalid or matches no param, or if every
      param would be frozen.
  """
  if isinstance(tx, FrozenTransformation):
    tx = tx.base
  if not patterns:
    return tx
  labels = freeze_labels(params, patterns)
  inner = optax.partition(
      {TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels
  )
  return FrozenTransformation(inner.init, inner.update, labels, tx)


def _strip_opt_state(flat: Mapping[str, Any]) -> dict[str, Any]:
  # A whole flat TrainState: keep its optimizer part.
  if any(k.startswith(_OPT_STATE) for k in flat):
    return {
        k[len(_OPT_STATE):]: v
        for k, v in flat.items()
        if k.startswith(_OPT_STATE)
    }
  return dict(flat)


def carry_opt_state(
    old_flat_opt_state: Mapping[str, Any],
    new_tx: optax.GradientTransformation,
    params: Any,
) -> optax.OptState:
  """Builds ``new_tx``'s state, carrying over what the old state has.

  Each leaf of ``new_tx.init(params)`` takes the old leaf at the same key,
  after removing the ``inner_states/{trainable,frozen}/inner_state/`` part
  that ``freeze`` adds (so a slot keeps its value when the frozen set
  changes, or when freezing starts or ends). Leaves with no old
  counterpart (slots of newly trainable params) stay fresh: zeros, and with
  ``hooks.optim`` a count of 0, so they get no bias-correction kick. Scalar
  leaves such as schedule counts are carried too, and counts that surgery
  expanded keep their shape (``hooks.counts``).

  Args:
    old_flat_opt_state: ``flatten(state.opt_state)``, or ``flatten(state)``
      (only its ``opt_state/`` keys are used).
    new_tx: The optimizer of the next phase.
    params: The current params pytree.

  Returns:
    The new optimizer state; carried leaves are the old objects.

  Raises:
    ValueError: If a carried leaf's shape differs from the fresh one (other
      than a count's).
  """
  old = {
      _PARTITION.sub('', k): v
      for k, v in _strip_opt_state(old_flat_opt_state).items()
  }
  new_state = new_tx.init(params)
  new_flat = flat_lib.flatten(new_state)
  shapes = {p: np.shape(v) for p, v in flat_lib.flatten(params).items()}
  out = {}
  for key, fresh in new_flat.items():
    carried = old.get(_PARTITION.sub('', key))
    if carried is None:
      out[key] = fresh
      continue
    counts.check_carry(key, np.shape(carried), np.shape(fresh), shapes)
    out[key] = carried
  return flat_lib.unflatten(out, new_state)


def freeze_state(state: Any, patterns: Sequence[str]) -> Any:
  """Freezes params of a ``TrainState`` in one call, keeping its slots.

  The new ``tx`` is ``freeze(state.tx, state.params, patterns)`` (a state
  frozen before is re-frozen from its base optimizer; ``[]`` unfreezes
  everything), and the new ``opt_state`` carries every leaf of the old one
  by key (``carry_opt_state``): slots that surgery edited stay as they are,
  params that become frozen lose their slots, and params that become
  trainable get fresh ones. An NNX state: ``nnx_freeze.freeze_state``.

  Args:
    state: A ``flax.training.train_state.TrainState`` or a subclass, or an
      NNX ``(model, nnx.Optimizer)``.
    patterns: Regexes over param paths without ``params/``.

  Returns:
    ``state.replace(tx=..., opt_state=...)``: the two agree; for NNX,
    ``(model, new_optimizer)``.

  Raises:
    ValueError: If a pattern is invalid or matches no param, if every param
      would be frozen, or if a slot's shape differs from the new state's.
  """
  if nnx_state.is_nnx(state):
    return nnx_freeze.freeze_state(state, patterns)
  tx = freeze(state.tx, state.params, patterns)
  opt_state = carry_opt_state(flat_lib.flatten(state.opt_state), tx,
                              state.params)
  return state.replace(tx=tx, opt_state=opt_state)
