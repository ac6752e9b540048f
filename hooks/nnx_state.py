"""The flat view of an NNX model and its ``nnx.Optimizer``.

Hooks see an NNX run under the names a Linen ``TrainState`` has, so one
hook, donor or checkpoint serves both APIs:

- a model variable goes under its Linen collection name (``nnx.Param`` ->
  ``params/Conv_0/kernel``, ``nnx.BatchStat`` -> ``batch_stats/...``,
  the names ``nnx.register_variable_name`` knows), without ``/value``;
- the optimizer's state goes under ``opt_state/...`` (slots end with their
  param's path, as in Linen: ``opt_state/0/mu/Conv_0/kernel``) and its
  step under ``step`` (``uint32`` in NNX, ``int32`` in a ``TrainState``:
  copies between them carry the value);
- RNG state (``nnx.RngKey``, ``nnx.RngCount``) is not part of the view.

An NNX state is a model, or a ``(model, optimizer)`` pair (an
``nnx.Optimizer`` does not hold its model). Edits are written back with
``nnx.update``, in place, after every hook has succeeded.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from flax import nnx
from flax.nnx import variablelib
import jax

from hooks import flat as flat_lib
from hooks import validation

__all__ = [
    'Trainable',
    'abstract',
    'base_filter',
    'flat_like',
    'flatten',
    'freeze_filter',
    'freeze_optimizer',
    'is_nnx',
    'rng_paths',
    'trainable_filter',
    'write',
]

_OPT_STATE = 'opt_state'


def _pair(state: Any) -> tuple[nnx.Module, nnx.Optimizer | None] | None:
  """``(model, optimizer)`` of an NNX state; None for anything else."""
  if isinstance(state, nnx.ModelAndOptimizer):
    return state.model, state  # Its view keeps only the optimizer's state.
  if isinstance(state, nnx.Module):
    return state, None
  if (isinstance(state, tuple) and len(state) == 2
      and isinstance(state[0], nnx.Module)
      and isinstance(state[1], nnx.Optimizer)):
    return state[0], state[1]
  return None


def is_nnx(state: Any) -> bool:
  """Whether ``state`` is an NNX model, a ``(model, nnx.Optimizer)`` pair or
  an ``nnx.ModelAndOptimizer``."""
  return _pair(state) is not None


def _parts(state: Any) -> tuple[nnx.Module, nnx.Optimizer | None]:
  pair = _pair(state)
  if pair is None:
    raise TypeError(
        'Expected an nnx.Module, a (model, nnx.Optimizer) pair or an '
        f'nnx.ModelAndOptimizer, got {type(state).__name__}.'
    )
  return pair


def _path(path: tuple[Any, ...]) -> str:
  return '/'.join(str(part) for part in path)


def _collection(variable_type: type[nnx.Variable], path: str) -> str:
  """The Linen collection of the nearest registered class (LoRAParam: Param)."""
  for cls in variable_type.__mro__:
    try:
      return variablelib.variable_name_from_type(cls)
    except ValueError:
      continue
  raise ValueError(
        f'The NNX variable {path!r} is a {variable_type.__name__}, which has '
        'no Linen collection name, so hooks cannot name it. Register one '
        f"first: nnx.register_variable_name('<name>', {variable_type.__name__})."
  )


def _model_items(model: nnx.Module) -> list[tuple[str, tuple[Any, ...], Any]]:
  items = []
  for path, variable in nnx.to_flat_state(nnx.state(model)):
    if isinstance(variable, nnx.RngState):
      continue
    name = _path(path)
    key = f'{_collection(type(variable), name)}/{name}'
    items.append((key, path, variable.get_value()))
  return items


def rng_paths(state: Any) -> set[str]:
  """The model paths of the RNG state the flat view leaves out.

  Args:
    state: An NNX state (see ``is_nnx``).

  Returns:
    ``'/'``-joined paths, e.g. ``{'dropout/rngs/key', 'dropout/rngs/count'}``.
  """
  model, _ = _parts(state)
  return {_path(path) for path, _ in
          nnx.to_flat_state(nnx.state(model, nnx.RngState))}


def _optimizer_items(optimizer: nnx.Optimizer
                     ) -> list[tuple[str, tuple[Any, ...], Any]]:
  # Only OptState variables: a ModelAndOptimizer also holds its model.
  return [(_path(path), path, variable.get_value())
          for path, variable in nnx.to_flat_state(nnx.state(optimizer))
          if isinstance(variable, nnx.OptState)]


def _items(state: Any) -> list[tuple[Any, list[tuple[str, tuple[Any, ...], Any]]]]:
  model, optimizer = _parts(state)
  items = [(model, _model_items(model))]
  if optimizer is not None:
    items.append((optimizer, _optimizer_items(optimizer)))
  return items


def flatten(state: Any) -> dict[str, Any]:
  """Returns the flat view of an NNX model, or of a model and its optimizer.

  Args:
    state: An ``nnx.Module``, or ``(model, nnx.Optimizer)``; concrete or
      abstract (``nnx.eval_shape``).

  Returns:
    Key -> value (the arrays themselves), model keys first.

  Raises:
    ValueError: If a variable type has no Linen collection name, or two
      variables would get the same key.
  """
  out: dict[str, Any] = {}
  for _, items in _items(state):
    for key, _, value in items:
      if key in out:
        raise ValueError(
            f'Two NNX variables have the flat key {key!r}; rename one.')
      out[key] = value
  return out


def write(state: Any, flat: Mapping[str, Any]) -> Any:
  """Writes a flat view back into the model and optimizer, in place.

  Args:
    state: The NNX state ``flat`` was made from.
    flat: Key -> value, with exactly the keys ``flatten(state)`` has.

  Returns:
    ``state`` (the same objects, updated with ``nnx.update``).

  Raises:
    StructureError: If ``flat`` lacks keys of ``state`` or has extra ones.
  """
  items = _items(state)
  known = {key for _, group in items for key, _, _ in group}
  missing = sorted(known - set(flat))
  unexpected = sorted(set(flat) - known)
  if missing or unexpected:
    raise validation.StructureError(missing, unexpected, what='NNX state')
  for obj, group in items:
    nnx.update(obj, nnx.from_flat_state(
        [(path, flat[key]) for key, path, _ in group]))
  return state


def abstract(state: Any) -> Any:
  """Returns an abstract copy (``ShapeDtypeStruct`` values, same sharding).

  Args:
    state: An NNX model or ``(model, optimizer)``.

  Returns:
    New objects of the same structure; ``state`` is not touched.
  """
  def to_struct(x: Any) -> Any:
    return jax.ShapeDtypeStruct(*validation.shape_dtype(x),
                                sharding=getattr(x, 'sharding', None))

  graphdef, values = nnx.split(state)
  return nnx.merge(graphdef, jax.tree.map(to_struct, values))


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
    name = _path(path)
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
  paths = [_path(path) for path, _ in
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
  old = dict(_optimizer_items_flat(optimizer))
  fresh = dict(_optimizer_items_flat(new))
  for key, value in fresh.items():
    previous = old.get(key)
    if previous is None:
      continue
    if validation.shape_dtype(previous)[0] != validation.shape_dtype(value)[0]:
      raise ValueError(
          f'Cannot carry optimizer leaf {key!r}: old shape '
          f'{validation.shape_dtype(previous)[0]}, new '
          f'{validation.shape_dtype(value)[0]}. Run surgery hooks to resize '
          'the state before changing the frozen set.'
      )
    fresh[key] = previous
  nnx.update(new, nnx.from_flat_state(
      [(path, fresh[key]) for key, path, _ in _optimizer_items(new)]))
  return new


def _optimizer_items_flat(optimizer: nnx.Optimizer) -> list[tuple[str, Any]]:
  return [(key, value) for key, _, value in _optimizer_items(optimizer)]


def flat_like(tree: Any) -> dict[str, Any]:
  """``flatten`` for NNX states, ``hooks.flatten`` for any other pytree."""
  return flatten(tree) if is_nnx(tree) else flat_lib.flatten(tree)
