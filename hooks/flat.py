"""Flat states: '/'-joined keys to leaves, and back.

Keys are ``jax.tree_util.keystr(path, simple=True, separator='/')`` of each
leaf path, so a Flax ``TrainState`` gives ``step``, ``params/Conv_0/kernel``,
``opt_state/0/mu/Conv_0/kernel`` and so on. Static fields (``apply_fn``,
``tx``), ``None``, empty optimizer states and ``optax.MaskedNode`` have no
leaves and so no keys.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import jax
import numpy as np

from hooks import validation

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

_PARAMS = 'params/'
_OPT_STATE = 'opt_state/'


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


def slot_index(flat: Mapping[str, Any]) -> dict[str, list[str]]:
  """Lists, for each param, the optimizer-state keys that mirror it.

  A slot of ``params/<p>`` is an ``opt_state/...`` key that ends with
  ``/<p>`` and has the param's shape (``opt_state/0/mu/Dense_1/kernel``,
  ``opt_state/inner_states/a/inner_state/0/nu/Dense_1/kernel``, ...). When
  several params' paths end a slot key, the longest wins.

  Args:
    flat: A flat ``TrainState`` (keys under ``params/`` and ``opt_state/``).

  Returns:
    ``params/<p>`` -> sorted slot keys, for every param (an empty list when the
    param has no slots, e.g. under SGD or when frozen).
  """
  params = {k[len(_PARAMS):]: k for k in flat if k.startswith(_PARAMS)}
  index: dict[str, list[str]] = {k: [] for k in params.values()}
  # Suffixes to try, longest first ('b/a/kernel' beats 'a/kernel'): only
  # as many parts as some param path has.
  depths = sorted({p.count('/') + 1 for p in params}, reverse=True)
  for key, leaf in flat.items():
    if not key.startswith(_OPT_STATE):
      continue
    parts = key.split('/')
    for depth in depths:
      if len(parts) - depth < 2:
        continue
      suffix = '/'.join(parts[-depth:])
      if suffix in params:
        param_key = params[suffix]
        if _shape(leaf) == _shape(flat[param_key]):
          index[param_key].append(key)
        break
  return {k: sorted(v) for k, v in index.items()}


def _shape(leaf: Any) -> tuple[int, ...]:
  shape = getattr(leaf, 'shape', None)
  return tuple(shape) if shape is not None else tuple(np.shape(leaf))


def param_keys(
    flat: Mapping[str, Any],
    patterns: Sequence[str],
    *,
    allow_empty: bool = False,
) -> list[str]:
  """Returns the ``params/`` keys whose path matches one of ``patterns``.

  Args:
    flat: A flat ``TrainState``.
    patterns: Regexes over the param path without ``params/`` (e.g.
      ``'Conv_0/.*'``), matched with ``re.fullmatch``.
    allow_empty: Whether a pattern may match no param.

  Returns:
    Matching keys, with their ``params/`` prefix, in the order of ``flat``.

  Raises:
    ValueError: If a pattern is not a valid regex or (unless
      ``allow_empty``) matches no param.
  """
  paths = [k[len(_PARAMS):] for k in flat if k.startswith(_PARAMS)]
  matched = validation.match_keys(patterns, paths, allow_empty=allow_empty)
  return [_PARAMS + p for p in matched]


def split_slot(slot_key: str, param_key: str) -> str:
  """Returns the slot part of a slot key: what precedes the param path.

  Args:
    slot_key: e.g. ``opt_state/0/mu/Dense_1/kernel``.
    param_key: e.g. ``params/Dense_1/kernel``.

  Returns:
    e.g. ``opt_state/0/mu``.

  Raises:
    ValueError: If ``slot_key`` does not end with the param's path.
  """
  suffix = '/' + param_key[len(_PARAMS):]
  if not param_key.startswith(_PARAMS) or not slot_key.endswith(suffix):
    raise ValueError(
        f'{slot_key!r} is not a slot of {param_key!r}: a slot key ends with '
        'the param key without its "params/" prefix.'
    )
  return slot_key[: -len(suffix)]
