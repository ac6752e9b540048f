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

from collections.abc import Mapping, Sequence
from typing import Any

import flax
from flax import nnx
from flax.nnx import variablelib
import jax

from hooks import validation

__all__ = [
    'abstract',
    'flatten',
    'is_nnx',
    'optimizer_items',
    'path_of',
    'rng_paths',
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


def _check_flax() -> None:
  major, minor = (int(part) for part in flax.__version__.split('.')[:2])
  if (major, minor) < (0, 11):
    raise RuntimeError(
        f'hooks on NNX states need flax 0.11 or later (an nnx.Optimizer '
        f'that does not hold its model); this is flax {flax.__version__}. '
        'Upgrade flax, or use a Linen TrainState.')


def _parts(state: Any) -> tuple[nnx.Module, nnx.Optimizer | None]:
  _check_flax()
  pair = _pair(state)
  if pair is None:
    raise TypeError(
        'Expected an nnx.Module, a (model, nnx.Optimizer) pair or an '
        f'nnx.ModelAndOptimizer, got {type(state).__name__}.'
    )
  return pair


def path_of(path: tuple[Any, ...]) -> str:
  """The '/'-joined name of an NNX state path."""
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
    name = path_of(path)
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
  return {path_of(path) for path, _ in
          nnx.to_flat_state(nnx.state(model, nnx.RngState))}


def optimizer_items(optimizer: nnx.Optimizer
                    ) -> list[tuple[str, tuple[Any, ...], Any]]:
  """``(flat key, NNX path, value)`` of the optimizer's state and step.

  Only ``nnx.OptState`` variables: a ``ModelAndOptimizer`` also holds its
  model.
  """
  return [(path_of(path), path, variable.get_value())
          for path, variable in nnx.to_flat_state(nnx.state(optimizer))
          if isinstance(variable, nnx.OptState)]


def _items(state: Any) -> list[tuple[Any, list[tuple[str, tuple[Any, ...], Any]]]]:
  model, optimizer = _parts(state)
  items = [(model, _model_items(model))]
  if optimizer is not None:
    items.append((optimizer, optimizer_items(optimizer)))
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
  graphdef, values = nnx.split(state)
  return nnx.merge(graphdef, jax.tree.map(validation.abstract_leaf, values))
