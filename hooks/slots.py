"""Params and their optimizer slots in a flat state."""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hooks import counts
from hooks import keys as keys_lib

__all__ = ['param_keys', 'slot_index', 'split_slot']

_PARAMS = 'params/'
_OPT_STATE = 'opt_state/'


def slot_index(flat: Mapping[str, Any]) -> dict[str, list[str]]:
  """Lists, for each param, the optimizer-state keys that mirror it.

  A slot of ``params/<p>`` is an ``opt_state/...`` key that ends with
  ``/<p>`` and has the param's shape (``opt_state/0/mu/Dense_1/kernel``,
  ``opt_state/inner_states/a/inner_state/0/nu/Dense_1/kernel``, ...), or
  ends with ``/count/<p>`` and has a count's shape (``hooks.counts``: every
  axis 1 or the param's, e.g. ``opt_state/0/count/Dense_1/kernel`` of shape
  ``(1, 1)``). When several params' paths end a slot key, the longest wins.

  Args:
    flat: A flat ``TrainState`` (keys under ``params/`` and ``opt_state/``).

  Returns:
    ``params/<p>`` -> sorted slot keys, for every param (an empty list when the
    param has no slots, e.g. under SGD or when frozen).
  """
  index = {}
  fits: dict[tuple[Any, Any], bool] = {}  # A handful of count shapes.
  for param_key, candidates in _CANDIDATES.get(tuple(flat)):
    slots = index[param_key] = []
    if not candidates:
      continue
    param_shape = _shape(flat[param_key])
    for key, is_count in candidates:
      shape = _shape(flat[key])
      if shape == param_shape:
        slots.append(key)
      elif is_count:
        pair = (shape, param_shape)
        if pair not in fits:
          fits[pair] = counts.fits(shape, param_shape)
        if fits[pair]:
          slots.append(key)
  return index


Candidates = list[tuple[str, list[tuple[str, bool]]]]


def _candidates(keys: tuple[str, ...]) -> Candidates:
  """``(param key, [(slot key, is_count), ...])`` that keys alone allow.

  Slot keys are sorted; only their shapes remain to be checked.
  """
  params = {k[len(_PARAMS):]: k for k in keys if k.startswith(_PARAMS)}
  found: dict[str, list[tuple[str, bool]]] = {k: [] for k in params.values()}
  # Suffixes to try, longest first ('b/a/kernel' beats 'a/kernel'): only
  # as many parts as some param path has.
  depths = sorted({p.count('/') + 1 for p in params}, reverse=True)
  for key in keys:
    if not key.startswith(_OPT_STATE):
      continue
    parts = key.split('/')
    for depth in depths:
      if len(parts) - depth < 2:
        continue
      suffix = '/'.join(parts[-depth:])
      if suffix in params:
        found[params[suffix]].append((key, parts[-depth - 1] == counts.NAME))
        break
  return [(k, sorted(v)) for k, v in found.items()]


class _CandidatesByKeys:
  """``_candidates`` of the last few key sets.

  Parsing keys costs microseconds a key, and a surgery indexes the same keys
  several times (hooks, the report): hashing and comparing the key tuple
  costs a few nanoseconds a key (the strings hash once, and equal keys are
  mostly the same objects).
  """

  def __init__(self, size: int = 8):
    self._size = size
    self._hits: collections.OrderedDict[tuple[str, ...], Candidates] = (
        collections.OrderedDict())

  def get(self, keys: tuple[str, ...]) -> Candidates:
    hit = self._hits.get(keys)
    if hit is None:
      hit = self._hits[keys] = _candidates(keys)
      if len(self._hits) > self._size:
        self._hits.popitem(last=False)
    else:
      self._hits.move_to_end(keys)
    return hit


_CANDIDATES = _CandidatesByKeys()


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
  matched = keys_lib.match_keys(patterns, paths, allow_empty=allow_empty)
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
