"""Freezing NNX params through ``nnx.Optimizer(wrt=...)``.

A frozen param is one the optimizer's ``wrt`` filter leaves out: it has no
slots, and a step that differentiates ``nnx.DiffState(0, optimizer.wrt)``
computes no gradient for it. ``freeze_optimizer`` changes the frozen set of
a live optimizer and carries every slot, count and the step by key; in a
loop, ``hooks.freeze_state((model, optimizer), patterns)`` calls it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from flax import nnx

from hooks import counts
from hooks import nnx_state
from hooks import validation

__all__ = [
    'Trainable',
    'base_filter',
    'freeze_filter',
    'freeze_optimizer',
    'freeze_state',
    'trainable_filter',
]


@dataclasses.dataclass(frozen=True)
class Trainable:
  """An NNX filter: what ``base`` selects, minus the frozen paths.

  Equal for equal arguments (a jitted step does not retrace for a new but
  equal filter), and it remembers ``base``, so that changing the frozen set
  starts again from what the optimizer trained before any freezing.

  Attributes:
    base: The filter of what the optimizer trains unfrozen (``nnx.Param``,
      ``nnx.LoRAParam``, ...).
    patterns: Regexes over param paths of the frozen variables,
      ``re.fullmatch``.
  """
  base: Any
  patterns: tuple[str, ...]

  def __call__(self, path: tuple[Any, ...], value: Any) -> bool:
    if not nnx.filterlib.to_predicate(self.base)(path, value):
      return False
    name = nnx_state.path_of(path)
    return not any(re.fullmatch(p, name) for p in self.patterns)


def base_filter(wrt: Any) -> Any:
  """What an optimizer's ``wrt`` trains before freezing."""
  return wrt.base if isinstance(wrt, Trainable) else wrt


def trainable_filter(patterns: Sequence[str], base: Any = nnx.Param) -> Any:
  """The ``wrt`` filter of the variables ``base`` selects minus ``patterns``.

  Args:
    patterns: Regexes over param paths (``'Conv_0/.*'``), ``re.fullmatch``,
      as for Linen's ``hooks.freeze``.
    base: What the optimizer trains unfrozen; default ``nnx.Param``.

  Returns:
    ``base`` itself when ``patterns`` is empty, else a ``Trainable``. Pass
    it as ``nnx.Optimizer(model, tx, wrt=...)`` and as
    ``nnx.DiffState(0, ...)`` to ``nnx.grad``, so frozen params get neither
    slots nor gradients.
  """
  base = base_filter(base)
  return Trainable(base, tuple(patterns)) if patterns else base


def freeze_filter(model: nnx.Module, patterns: Sequence[str],
                  base: Any = nnx.Param) -> Any:
  """Checks ``patterns`` against ``model`` and returns the trainable filter.

  Args:
    model: The NNX model.
    patterns: Regexes over the paths of what ``base`` selects, fullmatch.
    base: What the optimizer trains unfrozen; default ``nnx.Param``.

  Returns:
    ``trainable_filter(patterns, base)``.

  Raises:
    ValueError: If a pattern is invalid or matches nothing ``base``
      selects, or if everything would be frozen.
  """
  paths = [nnx_state.path_of(path) for path, _ in
           nnx.to_flat_state(nnx.state(model, base_filter(base)))]
  frozen = validation.match_keys(patterns, paths)
  if paths and len(frozen) == len(paths):
    raise ValueError(
        f'Freeze patterns {list(patterns)} match all {len(paths)} params: '
        'nothing left to train. Narrow the patterns or drop this phase.'
    )
  return trainable_filter(patterns, base)


def freeze_optimizer(model: nnx.Module, optimizer: nnx.Optimizer,
                     patterns: Sequence[str],
                     tx: Any = None) -> nnx.Optimizer:
  """Returns a new ``nnx.Optimizer`` that leaves ``patterns`` unchanged.

  The new ``wrt`` is what the old optimizer trained before any freezing
  (its ``wrt``, or a ``Trainable``'s ``base``) minus ``patterns``; ``[]``
  unfreezes everything it trained. Frozen params have no slots; every slot
  and count the old optimizer has under the same key is carried over (slots
  surgery edited stay as they are; params that become trainable get fresh
  slots, and with ``hooks.optim`` a count of 0, so no bias-correction
  kick), and so is the step.

  Args:
    model: The model.
    optimizer: Its current optimizer.
    patterns: Regexes over param paths, ``re.fullmatch``.
    tx: The optax transformation; default ``optimizer.tx``.

  Returns:
    The new optimizer.

  Raises:
    ValueError: If a pattern is invalid or matches no param, if every param
      would be frozen, or if a carried leaf's shape differs.
  """
  wrt = freeze_filter(model, patterns, optimizer.wrt)
  new = nnx.Optimizer(model, optimizer.tx if tx is None else tx, wrt=wrt)
  old = {key: value for key, _, value in nnx_state.optimizer_items(optimizer)}
  items = nnx_state.optimizer_items(new)
  fresh = {key: value for key, _, value in items}
  shapes = {nnx_state.path_of(path): validation.shape_dtype(v.get_value())[0]
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  for key, value in fresh.items():
    previous = old.get(key)
    if previous is None:
      continue
    counts.check_carry(key, validation.shape_dtype(previous)[0],
                       validation.shape_dtype(value)[0], shapes)
    fresh[key] = previous
  nnx.update(new, nnx.from_flat_state(
      [(path, fresh[key]) for key, path, _ in items]))
  return new


def freeze_state(state: Any, patterns: Sequence[str]
                 ) -> tuple[nnx.Module, nnx.Optimizer]:
  """``hooks.freeze_state`` on an NNX ``(model, optimizer)``.

  Args:
    state: ``(model, nnx.Optimizer)``.
    patterns: Regexes over param paths, ``re.fullmatch``.

  Returns:
    ``(model, freeze_optimizer(model, optimizer, patterns))``.

  Raises:
    ValueError: If ``state`` is not a pair, or as ``freeze_optimizer``.
  """
  if not isinstance(state, tuple):
    raise ValueError(
        'freeze_state needs the optimizer: pass (model, nnx.Optimizer), '
        f'not a {type(state).__name__} alone.')
  model, optimizer = state
  return model, freeze_optimizer(model, optimizer, patterns)
