"""Flat states: '/'-joined keys to leaves, and back.

Keys are ``jax.tree_util.keystr(path, simple=True, separator='/')`` of each
leaf path, so a Flax ``TrainState`` gives ``step``, ``params/Conv_0/kernel``,
``opt_state/0/mu/Conv_0/kernel`` and so on. Static fields (``apply_fn``,
``tx``), ``None``, empty optimizer states and ``optax.MaskedNode`` have no
leaves and so no keys.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Mapping
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
    'flatten_with_rebuild',
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
  not remembered. Comparing two treedefs costs up to a microsecond a leaf,
  so a lookup compares once: the order is kept by the stored treedef, which
  the dict finds by identity.
  """

  def __init__(self, size: int = 32):
    self._size = size
    self._keys: collections.OrderedDict[Any, tuple[Any, list[str]]] = (
        collections.OrderedDict())

  def get(self, tree: Any, treedef: Any) -> list[str]:
    try:
      hit = self._keys.get(treedef)
    except TypeError:  # Unhashable static data.
      return _keys_with_paths(tree)
    if hit is None:
      keys = _keys_with_paths(tree)
      self._keys[treedef] = (treedef, keys)
      if len(self._keys) > self._size:
        self._keys.popitem(last=False)
      return keys
    self._keys.move_to_end(hit[0])
    return hit[1]


_KEYS = _KeysByStructure()


def _flat_parts(tree: Any) -> tuple[list[Any], Any, list[str]]:
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return leaves, treedef, _KEYS.get(tree, treedef)


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
  leaves, _, keys = _flat_parts(tree)
  return dict(zip(keys, leaves))


def _rebuild(flat: Mapping[str, Any], treedef: Any, keys: list[str]) -> Any:
  try:
    leaves = [flat[k] for k in keys]
  except KeyError:
    leaves = None
  if leaves is None or len(flat) != len(keys):  # Keys are unique: same set.
    known = set(keys)
    raise validation.StructureError(
        [k for k in keys if k not in flat],
        [k for k in flat if k not in known], what='flat state')
  return jax.tree_util.tree_unflatten(treedef, leaves)


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
  treedef = jax.tree_util.tree_structure(target)
  return _rebuild(flat, treedef, _KEYS.get(target, treedef))


def flatten_with_rebuild(
    tree: T,
) -> tuple[dict[str, Any], Callable[[Mapping[str, Any]], T]]:
  """``flatten(tree)``, and ``unflatten(·, tree)`` without a second flatten.

  Flattening a large state costs microseconds a leaf: a surgery that writes
  its result back into the structure it read keeps that structure here.

  Args:
    tree: Any pytree, as for ``flatten``.

  Returns:
    ``(flat, rebuild)``: the flat state, and ``rebuild(new_flat)``, which
    does what ``unflatten(new_flat, tree)`` does.

  Raises:
    ValueError: As for ``flatten``.
  """
  leaves, treedef, keys = _flat_parts(tree)
  return (dict(zip(keys, leaves)),
          functools.partial(_rebuild, treedef=treedef, keys=keys))


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
