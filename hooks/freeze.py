"""Freezing params through the optimizer, and schedules of frozen sets.

Frozen params get ``optax.set_to_zero()`` updates and no optimizer slots:
``freeze`` wraps the optimizer in ``optax.multi_transform`` with labels
``'trainable'`` and ``'frozen'``. Their gradients are then unused, and XLA
drops the work that computes them; a loss function that passes its params
through ``stop_frozen_gradients`` does not differentiate frozen layers at all
(they run as plain inference, which XLA compiles tighter). When the frozen
set changes, the new optimizer state is built fresh and the slots of params
that stay trainable are carried over (``carry_opt_state``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax

from hooks import flat as flat_lib
from hooks import validation

__all__ = [
    'FROZEN',
    'TRAINABLE',
    'FreezeSchedule',
    'FrozenTransformation',
    'carry_opt_state',
    'freeze',
    'freeze_labels',
    'stop_frozen_gradients',
]

TRAINABLE = 'trainable'
FROZEN = 'frozen'

# The path multi_transform puts above a partition's state: the part of a slot
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
  paths = list(flat_lib.flatten(params))
  frozen = validation.match_keys(patterns, paths)
  if len(frozen) == len(paths):
    raise ValueError(
        f'Freeze patterns {list(patterns)} match all {len(paths)} params: '
        'nothing left to train. Narrow the patterns or drop this phase.'
    )
  return jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(params),
      [FROZEN if path in frozen else TRAINABLE for path in paths],
  )


class FrozenTransformation(optax.GradientTransformationExtraArgs):
  """What ``freeze`` returns: ``optax.multi_transform``'s ``init`` and
  ``update``, and the labels it partitions the params by.

  Attributes:
    labels: A pytree like the params: ``'frozen'`` or ``'trainable'``.
  """

  # A NamedTuple subclass without __slots__: instances can carry `labels`.
  def __new__(cls, init: Any, update: Any, labels: Any) -> FrozenTransformation:
    self = super().__new__(cls, init, update)
    self.labels = labels
    return self

  def __getnewargs__(self) -> tuple[Any, Any, Any]:
    return self.init, self.update, self.labels


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
    ``optax.multi_transform({'trainable': tx, 'frozen': set_to_zero()},
    labels)`` as a ``FrozenTransformation`` (which knows ``labels``). Slot
    keys then read
    ``opt_state/inner_states/trainable/inner_state/0/mu/Dense_1/kernel``.

  Raises:
    ValueError: If a pattern is invalid or matches no param, or if every
      param would be frozen.
  """
  if not patterns:
    return tx
  labels = freeze_labels(params, patterns)
  inner = optax.multi_transform(
      {TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels
  )
  return FrozenTransformation(inner.init, inner.update, labels)


def _step(value: Any) -> int:
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    step = int(value)
  elif isinstance(value, str) and value.isdigit():
    step = int(value)
  else:
    raise ValueError(
        f'Freeze schedule step {value!r} must be a non-negative integer (or a '
        "string of digits, e.g. '100')."
    )
  if step < 0:
    raise ValueError(f'Freeze schedule step {step} must be >= 0.')
  return step


def _patterns(step: int, value: Any) -> tuple[str, ...]:
  if isinstance(value, str) or not isinstance(value, Sequence):
    raise ValueError(
        f'Freeze schedule at step {step}: {value!r} must be a list of regexes, '
        "e.g. ['Conv_.*'] (or [] to train everything)."
    )
  validation.match_keys(value, [], allow_empty=True)  # Checks each regex.
  return tuple(value)


@dataclasses.dataclass(frozen=True)
class FreezeSchedule:
  """Which params are frozen from which step on.

  Attributes:
    phases: ``(step, patterns)`` pairs sorted by step; the patterns apply
      from that step until the next one. Before the first step nothing is
      frozen.
  """

  phases: tuple[tuple[int, tuple[str, ...]], ...] = ()

  @classmethod
  def parse(cls, schedule: Mapping[Any, Sequence[str]]) -> FreezeSchedule:
    """Parses ``{step: patterns}``, e.g. ``{0: ['Conv_.*'], 200: []}``.

    Args:
      schedule: Step (int or digit string, as config dicts need) -> regexes
        over param paths frozen from that step on.

    Returns:
      The schedule.

    Raises:
      ValueError: If a step is not a non-negative integer, two keys give the
        same step, or patterns are not a list of valid regexes.
    """
    phases: dict[int, tuple[str, ...]] = {}
    for key, value in schedule.items():
      step = _step(key)
      if step in phases:
        raise ValueError(
            f'Freeze schedule gives step {step} twice ({key!r}); keep one.'
        )
      phases[step] = _patterns(step, value)
    return cls(tuple(sorted(phases.items())))

  @property
  def boundaries(self) -> tuple[int, ...]:
    """The steps at which the frozen set changes."""
    return tuple(step for step, _ in self.phases)

  def phase_index(self, step: int) -> int:
    """Returns the index of the phase ``step`` is in (-1 before the first)."""
    index = -1
    for i, (start, _) in enumerate(self.phases):
      if step >= start:
        index = i
    return index

  def phase_at(self, step: int) -> tuple[str, ...]:
    """Returns the patterns frozen at ``step`` (empty: nothing frozen)."""
    index = self.phase_index(step)
    return self.phases[index][1] if index >= 0 else ()

  def tx_at(
      self, step: int, tx: optax.GradientTransformation, params: Any
  ) -> optax.GradientTransformation:
    """Returns ``freeze(tx, params, self.phase_at(step))``."""
    return freeze(tx, params, self.phase_at(step))


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
  leaves such as schedule counts are carried too.

  Args:
    old_flat_opt_state: ``flatten(state.opt_state)``, or ``flatten(state)``
      (only its ``opt_state/`` keys are used).
    new_tx: The optimizer of the next phase.
    params: The current params pytree.

  Returns:
    The new optimizer state; carried leaves are the old objects.

  Raises:
    ValueError: If a carried leaf's shape differs from the fresh one.
  """
  old = {
      _PARTITION.sub('', k): v
      for k, v in _strip_opt_state(old_flat_opt_state).items()
  }
  new_state = new_tx.init(params)
  new_flat = flat_lib.flatten(new_state)
  out = {}
  for key, fresh in new_flat.items():
    carried = old.get(_PARTITION.sub('', key))
    if carried is None:
      out[key] = fresh
      continue
    if np.shape(carried) != np.shape(fresh):
      raise ValueError(
          f'Cannot carry optimizer leaf {key!r}: old shape '
          f'{np.shape(carried)}, new {np.shape(fresh)}. Run surgery hooks to '
          'resize the state before changing the frozen set.'
      )
    out[key] = carried
  return flat_lib.unflatten(out, new_state)
