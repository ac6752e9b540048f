"""Flat states: '/'-joined keys to leaves, and back.

Keys are ``jax.tree_util.keystr(path, simple=True, separator='/')`` of each
leaf path, so a Flax ``TrainState`` gives ``step``, ``params/Conv_0/kernel``,
``opt_state/0/mu/Conv_0/kernel`` and so on. Static fields (``apply_fn``,
``tx``), ``None``, empty optimizer states and ``optax.MaskedNode`` have no
leaves and so no keys.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any, TypeVar

import jax
import numpy as np

from hooks import validation
# Params and their slots live in hooks.slots; re-exported for callers here.
from hooks.slots import param_keys
from hooks.slots import slot_index
from hooks.slots import split_slot

__all__ = [
    'flatten',
    'flatten_raw',
    'key_of',
    'param_keys',
    'slot_index',
    'split_slot',
    'unflatten',
]

T = TypeVar('T')


_SIMPLE_ENTRY = {
    jax.tree_util.DictKey: lambda entry: str(entry.key),
    jax.tree_util.SequenceKey: lambda entry: str(entry.idx),
    jax.tree_util.GetAttrKey: lambda entry: str(entry.name),
    jax.tree_util.FlattenedIndexKey: lambda entry: str(entry.key),
}


def key_of(path: tuple[Any, ...]) -> str:
  """Returns the flat key of a pytree path (``'/'``-joined, no brackets).

  The same string as ``jax.tree_util.keystr(path, simple=True,
  separator='/')``, built without its per-entry pattern match.
  """
  return '/'.join([_SIMPLE_ENTRY.get(type(entry), str)(entry)
                   for entry in path])


def _keys_with_paths(tree: Any) -> list[str]:
  keys = [key_of(path) for path, _ in
          jax.tree_util.tree_flatten_with_path(tree)[0]]
  if len(set(keys)) != len(keys):
    seen = set()
    for key in keys:
      if key in seen:
        raise ValueError(
            f'Two leaves have the flat key {key!r} (paths differ only in key '
            "type, e.g. 0 and '0', or a key contains '/'); rename one of them."
        )
      seen.add(key)
  return keys


class _KeysByStructure:
  """The flat keys of a tree structure, remembered for the last few.

  Keys depend only on the structure, and building key paths costs far more
  than flattening (tens of microseconds a leaf against one): a surgery
  flattens the same structure many times (the state, its abstract target,
  validation, unflatten). Structures whose static data cannot be hashed are
  not remembered.
  """

  def __init__(self, size: int = 32):
    self._size = size
    self._keys: collections.OrderedDict[Any, list[str]] = (
        collections.OrderedDict())

  def get(self, tree: Any, treedef: Any) -> list[str]:
    try:
      keys = self._keys.get(treedef)
    except TypeError:  # Unhashable static data.
      return _keys_with_paths(tree)
    if keys is None:
      keys = _keys_with_paths(tree)
      self._keys[treedef] = keys
      if len(self._keys) > self._size:
        self._keys.popitem(last=False)
    else:
      self._keys.move_to_end(treedef)
    return keys


_KEYS = _KeysByStructure()


def _flat_with_treedef(tree: Any) -> tuple[dict[str, Any], Any]:
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = _KEYS.get(tree, treedef)
  return dict(zip(keys, leaves)), treedef


def flatten(tree: Any) -> dict[str, Any]:
  """Flattens a pytree (e.g. a ``TrainState``) into a flat state.

  Args:
    tree: Any pytree; leaves may be arrays, scalars or ``ShapeDtypeStruct``.

  Returns:
    Key -> leaf, in pytree order. The values are the leaves themselves, not
    copies.

  Raises:
    ValueError: If two leaves would get the same key.
  """
  return _flat_with_treedef(tree)[0]


def unflatten(flat: Mapping[str, Any], target: T) -> T:
  """Rebuilds a pytree with the structure of ``target`` from a flat state.

  Only keys are checked; compare shapes and dtypes with
  ``validation.check_structure`` before restoring.

  Args:
    flat: Key -> leaf, with exactly the keys ``flatten(target)`` has.
    target: A pytree (concrete or abstract) that gives the tree structure,
      e.g. a ``TrainState``; its leaves are not used.

  Returns:
    A pytree of the same type as ``target`` whose leaves are the values of
    ``flat`` (the same objects).

  Raises:
    StructureError: If ``flat`` lacks keys of ``target`` or has extra ones.
  """
  target_flat, treedef = _flat_with_treedef(target)
  missing = [k for k in target_flat if k not in flat]
  unexpected = [k for k in flat if k not in target_flat]
  if missing or unexpected:
    raise validation.StructureError(missing, unexpected, what='flat state')
  return jax.tree_util.tree_unflatten(treedef, [flat[k] for k in target_flat])


def _as_array(leaf: Any) -> Any:
  if isinstance(leaf, (bool, int, float, complex, np.generic)):
    return np.asarray(leaf)
  return leaf


def flatten_raw(tree: Any) -> dict[str, Any]:
  """Flattens a checkpoint restored without a target.

  Orbax and msgpack give nested dicts and lists, with ``None`` or ``{}`` where
  the live state had an empty optimizer state or an ``optax.MaskedNode``, and
  Python scalars where it had 0-d arrays. Integer and digit-string keys both
  give digit keys, so the result has the keys ``flatten`` gives for the live
  state.

  Args:
    tree: Nested dicts/lists/tuples of arrays and scalars.

  Returns:
    Key -> leaf; ``None`` leaves are dropped and scalars become 0-d
    ``np.ndarray``.

  Raises:
    ValueError: If two leaves would get the same key.
  """
  return {k: _as_array(v) for k, v in flatten(tree).items()}
