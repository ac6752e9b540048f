"""Tensor transfers: which part of a source tensor fills which part of a target.

A ``Transfer`` says, per axis, which target indices take which source indices:
all of an equal-size axis, the overlapping prefix of two sizes, or the
entries of the same labels on a labelled axis (``hooks.pairing``), at any
position. One transfer is computed per param and applied to the param and to
each of its optimizer slots, so the slots always move with their param.
Values are computed where the leaf they replace lives: on its devices when it
is a ``jax.Array`` (``apply_on_device``: no device value is copied to the
host), else on the host (``apply``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    'Transfer',
    'place',
    'on_device',
    'plan',
    'to_numpy',
]

# Per axis: None (every index of an axis both tensors have at the same size)
# or (target indices, source indices).
AxisIndex = tuple[tuple[int, ...], tuple[int, ...]] | None


@dataclasses.dataclass(frozen=True)
class Transfer:
  """Which source entries fill which target entries.

  Attributes:
    target_shape: The shape of the result.
    source_shape: The shape of the source.
    index: One ``AxisIndex`` per axis.
  """

  target_shape: tuple[int, ...]
  source_shape: tuple[int, ...]
  index: tuple[AxisIndex, ...]

  @property
  def is_copy(self) -> bool:
    """Whether the whole source becomes the target unchanged."""
    return self.target_shape == self.source_shape and all(
        i is None for i in self.index
    )

  @property
  def is_empty(self) -> bool:
    """Whether no entry is transferred."""
    return any(i is not None and not i[0] for i in self.index)

  def apply(self, base: Any, source: Any, dtype: Any) -> np.ndarray:
    """Returns ``base`` (target shape) with the transferred entries of ``source``.

    Args:
      base: What entries not transferred keep (fresh values, zeros); unused
        when ``is_copy``.
      source: The source tensor.
      dtype: The result dtype.

    Returns:
      A new host array of ``target_shape``.
    """
    source = np.asarray(source)
    if self.is_copy:
      return np.array(source, dtype=dtype)
    out = np.array(np.broadcast_to(to_numpy(base), self.target_shape), dtype=dtype)
    target_ix, source_ix = self._indices()
    out[target_ix] = source[source_ix].astype(dtype)
    return out

  def _indices(self) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """(target, source) open-mesh indices (``np.ix_``) of the moved entries."""
    target_ix, source_ix = [], []
    for size, index in zip(self.target_shape, self.index):
      if index is None:
        target_ix.append(np.arange(size))
        source_ix.append(np.arange(size))
      else:
        target_ix.append(np.asarray(index[0], dtype=np.int64))
        source_ix.append(np.asarray(index[1], dtype=np.int64))
    return np.ix_(*target_ix), np.ix_(*source_ix)

  def apply_on_device(self, base: Any, source: Any, like: jax.Array
                      ) -> jax.Array:
    """``apply`` computed where ``like`` lives; no device value goes to the host.

    Host values (a donor's tensors, scalar bases) go to the device; device
    values (the fresh leaf as ``base``, an incoming leaf as ``source``) stay
    there. The entries are the same as ``apply``'s.

    Args:
      base: What entries not transferred keep (a device array, a host
        array or a scalar); unused when ``is_copy``.
      source: The source tensor (host or device).
      like: A ``jax.Array`` for which ``on_device(like, self.target_shape)``
        holds: the result takes its dtype and sharding.

    Returns:
      A new ``jax.Array`` of ``target_shape``.
    """
    dtype = like.dtype
    sharding = like.sharding
    if self.is_copy:
      if isinstance(source, jax.Array):
        return jax.device_put(source.astype(dtype), sharding)
      return jax.device_put(np.asarray(source, dtype=dtype), sharding)
    target_ix, source_ix = self._indices()
    if isinstance(source, jax.Array):
      moved = source[source_ix].astype(dtype)
    else:
      moved = np.asarray(source)[source_ix].astype(dtype)
    if isinstance(base, jax.Array):
      base = jnp.broadcast_to(base.astype(dtype), self.target_shape)
    else:
      base = jnp.broadcast_to(jnp.asarray(to_numpy(base), dtype),
                              self.target_shape)
    return jax.device_put(base.at[target_ix].set(moved), sharding)


def plan(
    target_shape: Sequence[int],
    source_shape: Sequence[int],
    *,
    labelled: Mapping[int, tuple[Sequence[int], Sequence[int]]] | None = None,
    overlap: bool = False,
) -> Transfer | None:
  """Plans the transfer of a source tensor into a target tensor.

  Args:
    target_shape: The target's shape.
    source_shape: The source's shape.
    labelled: Axis (negative counts from the end) -> (target indices, source
      indices) of that axis, e.g. from ``hooks.labels.pairs``; the other
      axes are matched by size.
    overlap: Whether axes of different sizes transfer their common prefix
      (``[:min(a, b)]``); otherwise they make the shapes mismatch.

  Returns:
    The transfer, or None if the shapes do not fit (ranks differ, a
    labelled axis is out of range, or an axis differs and ``overlap`` is
    false).
  """
  target_shape, source_shape = tuple(target_shape), tuple(source_shape)
  rank = len(target_shape)
  if len(source_shape) != rank:
    return None
  axes = {}
  for axis, pair in (labelled or {}).items():
    if not -rank <= axis < rank:
      return None
    axes[axis % rank] = (tuple(pair[0]), tuple(pair[1]))
  index: list[AxisIndex] = []
  for axis, (t, s) in enumerate(zip(target_shape, source_shape)):
    if axis in axes:
      index.append(axes[axis])
    elif t == s:
      index.append(None)
    elif overlap:
      common = tuple(range(min(t, s)))
      index.append((common, common))
    else:
      return None
  return Transfer(target_shape, source_shape, tuple(index))


def on_device(leaf: Any, shape: Sequence[int] | None = None) -> bool:
  """Whether a value of ``shape`` can be computed where ``leaf`` lives.

  True for a ``jax.Array`` that this process addresses alone whose sharding
  fits ``shape`` too (the same shape, or replicated).
  """
  if not isinstance(leaf, jax.Array) or not leaf.is_fully_addressable:
    return False
  return (shape is None or tuple(shape) == tuple(leaf.shape)
          or leaf.sharding.is_fully_replicated)


def to_numpy(leaf: Any) -> np.ndarray:
  """Returns a leaf (array or scalar) as a host array."""
  return np.asarray(leaf)


def place(value: np.ndarray, like: Any) -> Any:
  """Puts a host value where ``like`` is (same sharding) when shapes agree.

  Args:
    value: The new host value.
    like: The leaf it replaces: a ``jax.Array`` (its sharding is kept when
      the shape is the same), or anything else (the host value is returned).

  Returns:
    A ``jax.Array`` placed like ``like``, or ``value``.
  """
  if not isinstance(like, jax.Array) or tuple(like.shape) != value.shape:
    return value
  if like.is_fully_addressable:
    return jax.device_put(value, like.sharding)
  return jax.make_array_from_callback(
      value.shape, like.sharding, lambda index: value[index]
  )
