"""Adam's per-tensor counts: which optimizer leaves are counts, how they move.

``hooks.optim`` keeps one ``int32`` bias-correction count per param, at
``opt_state/.../count/<param path>``, shaped ``(1,) * param.ndim``: one
value that broadcasts against the param in the update, with the param's
rank, so that an axis (``-1``: a head's columns, ``0``: an embedding's rows)
names the same axis of both. Surgery expands a count only along an axis it
edits: a (256, 5) head resized to ten classes gets a (1, 10) count, the
kept columns at their count and the new ones at 0 (a first Adam step, no
bias-correction kick); relabelled embedding rows give an (n, 1) count.

Any shape whose every axis is 1 or the param's is a count of that param, so
the per-element counts of older checkpoints load and train as they are.
Shapes follow from shapes alone, so a plan and a run agree; only
``hooks.optim.compact_counts`` looks at values.
"""

from __future__ import annotations

from collections.abc import Container, Mapping, Sequence
from typing import Any

import numpy as np

from hooks import transfer

__all__ = ['NAME', 'check_carry', 'fits', 'is_count', 'owner', 'plan',
           'replaces', 'slot_transfer']

NAME = 'count'  # The field of hooks.optim.ScaleByAdamState.


def fits(shape: Sequence[int], param_shape: Sequence[int]) -> bool:
  """Whether a count of ``shape`` can serve a param of ``param_shape``.

  Args:
    shape: The count's shape.
    param_shape: The param's shape.

  Returns:
    True when the ranks agree and every axis is 1 or the param's size.
  """
  shape, param_shape = tuple(shape), tuple(param_shape)
  return len(shape) == len(param_shape) and all(
      c in (1, p) for c, p in zip(shape, param_shape))


def is_count(slot_path: str) -> bool:
  """Whether a slot's optimizer path (``flat.split_slot``'s) is a count.

  Args:
    slot_path: e.g. ``'opt_state/0/count'``.

  Returns:
    True when its last part is ``count`` (hooks.optim's field).
  """
  return slot_path.rsplit('/', 1)[-1] == NAME


def owner(key: str, paths: Container[str]) -> str | None:
  """The param path whose count ``key`` is (the longest), or None.

  Args:
    key: A flat key, e.g. ``'opt_state/0/count/Dense_1/kernel'``.
    paths: Param paths without ``params/``, e.g. ``{'Dense_1/kernel'}``.

  Returns:
    e.g. ``'Dense_1/kernel'``; None when ``key`` is not ``.../count/<path>``
    of a path in ``paths``.
  """
  parts = key.split('/')
  for index in range(len(parts) - 1):
    if parts[index] == NAME:
      path = '/'.join(parts[index + 1:])
      if path in paths:
        return path
  return None


def replaces(key: str, shape: Sequence[int], fresh_shape: Sequence[int],
             param_shapes: Mapping[str, Sequence[int]]) -> bool:
  """Whether a leaf of ``shape`` may stand at ``key`` for one of ``fresh_shape``.

  Args:
    key: The leaf's flat key (with or without ``opt_state/``).
    shape: The leaf's shape.
    fresh_shape: The shape a fresh state has there.
    param_shapes: Param path (no ``params/``) -> shape.

  Returns:
    True for equal shapes, or when ``key`` is the count of a param and both
    shapes fit it.
  """
  if tuple(shape) == tuple(fresh_shape):
    return True
  path = owner(key, param_shapes)
  return path is not None and fits(shape, param_shapes[path]) and fits(
      fresh_shape, param_shapes[path])


def check_carry(key: str, shape: Sequence[int], fresh_shape: Sequence[int],
                param_shapes: Mapping[str, Sequence[int]]) -> None:
  """Raises unless an optimizer leaf may be carried into a new optimizer.

  Args:
    key: The leaf's key in the optimizer state.
    shape: The old leaf's shape.
    fresh_shape: The new optimizer's fresh leaf's shape.
    param_shapes: Param path (no ``params/``) -> shape.

  Raises:
    ValueError: If not ``replaces(...)``.
  """
  if not replaces(key, shape, fresh_shape, param_shapes):
    raise ValueError(
        f'Cannot carry optimizer leaf {key!r}: old shape {tuple(shape)}, new '
        f'{tuple(fresh_shape)}. Run surgery hooks to resize the state before '
        'changing the frozen set.')


def plan(param: transfer.Transfer, source_shape: Sequence[int],
         base_shape: Sequence[int] = ()) -> transfer.Transfer:
  """The transfer of a count whose param moves by ``param``.

  Axis by axis, the result stays 1 where one value serves every entry: the
  source count is 1 there, ``param`` gives every target entry a source
  entry, and the base (what entries without a source keep, as
  ``Transfer.apply`` takes it) is 1 there. Otherwise the axis takes the
  param's size and each target entry the count of its source entry.

  Args:
    param: The param's transfer.
    source_shape: The source count's shape (it fits the source param).
    base_shape: The base's shape: ``()`` for a scalar (a fresh count's 0),
      or a count of the target param (a target's own count).

  Returns:
    A transfer from the source count; its ``target_shape`` fits the target
    param.

  Raises:
    ValueError: If a shape is not a count of its param.
  """
  source_shape = tuple(source_shape)
  rank = len(param.target_shape)
  base_shape = (1,) * (rank - len(tuple(base_shape))) + tuple(base_shape)
  if not (fits(source_shape, param.source_shape)
          and fits(base_shape, param.target_shape)):
    raise ValueError(
        f'A count of {source_shape} (base {base_shape}) does not fit the '
        f'params {param.source_shape} -> {param.target_shape}: each axis of '
        "a count is 1 or its param's.")
  shape, index = [], []
  for size, source, base, axis in zip(param.target_shape, source_shape,
                                      base_shape, param.index):
    covered = axis is None or len(axis[0]) == size
    if source == 1 and base == 1 and covered:
      shape.append(1)
      index.append(None)
      continue
    shape.append(size)
    if axis is None and source == size:
      index.append(None)
      continue
    t_index, s_index = axis or (tuple(range(size)), tuple(range(size)))
    index.append((t_index, (0,) * len(s_index) if source == 1 else s_index))
  return transfer.Transfer(tuple(shape), source_shape, tuple(index))


def slot_transfer(slot_path: str, param: transfer.Transfer, source: Any,
                  base: Any = 0) -> transfer.Transfer:
  """How a slot moves when its param moves by ``param``.

  Args:
    slot_path: The slot's optimizer path (``flat.split_slot``'s; a trailing
      ``'/'`` is ignored), e.g. ``'opt_state/0/mu'``.
    param: The param's transfer.
    source: The source slot (an array or ``ShapeDtypeStruct``).
    base: What the slot's entries without a source keep: a scalar, or the
      target's own slot.

  Returns:
    ``param`` for a slot shaped like its param; for a count, ``plan(param,
    shape of source, shape of base)``.
  """
  if not is_count(slot_path.rstrip('/')):
    return param
  return plan(param, np.shape(source), np.shape(base))
