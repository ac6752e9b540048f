"""Donor tensors read shard by shard into targets split over devices.

A whole-tensor copy into a ``jax.Array`` whose sharding splits it (over
devices, maybe over processes) reads only the parts this process holds
(``DonorReader.read_slices``) and places each on its devices
(``jax.make_array_from_callback``): each device receives its shard, and no
process holds the whole tensor on the host. A donor that stores a tensor as
one chunk still gives each process the whole tensor to read; the report says
so (``whole_reads_note``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from hooks import copy_plan
from hooks import transfer
from hooks.readers import DonorReader
from hooks.readers import Index

__all__ = ['assemble', 'read_shards', 'shard_indices', 'whole_reads_note']


def _index(index: tuple[slice, ...], shape: Sequence[int]) -> Index:
  """jax's slices of a shard as ``(start, stop)`` per axis."""
  out = []
  for axis, size in zip(index, shape):
    start, stop, step = axis.indices(size)
    if step != 1:
      raise ValueError(f'a shard index with step {step} ({index}) is not a '
                       'block of the array')
    out.append((start, stop))
  return tuple(out)


def shard_indices(leaf: Any) -> list[Index] | None:
  """The distinct parts of ``leaf`` this process holds, when split.

  Args:
    leaf: A target leaf.

  Returns:
    The ``(start, stop)`` per axis of each addressable shard, without
    repeats (replicas), in device order; None unless ``leaf`` is a
    ``jax.Array`` whose sharding splits it.
  """
  if not isinstance(leaf, jax.Array) or leaf.sharding.is_fully_replicated:
    return None
  shards = leaf.sharding.addressable_devices_indices_map(leaf.shape)
  return list(dict.fromkeys(_index(i, leaf.shape) for i in shards.values()))


def assemble(like: jax.Array, indices: Sequence[Index],
             pieces: Sequence[np.ndarray]) -> jax.Array:
  """A ``jax.Array`` placed like ``like`` from the host parts it holds.

  Args:
    like: The leaf the result replaces: its shape, dtype and sharding.
    indices: The parts (``shard_indices(like)``).
    pieces: The host value of each part.

  Returns:
    The array; each device receives its shard only.
  """
  by_index = {index: np.asarray(piece, like.dtype)
              for index, piece in zip(indices, pieces)}
  return jax.make_array_from_callback(
      like.shape, like.sharding,
      lambda index: by_index[_index(index, like.shape)])


def read_shards(reader: DonorReader,
                targets: Mapping[str, Sequence[tuple[str, transfer.Transfer]]],
                flat: Mapping[str, Any]) -> dict[str, dict[str, jax.Array]]:
  """Reads the whole-tensor copies into split leaves, shard by shard.

  Args:
    reader: The donor.
    targets: Donor key -> the (target key, transfer) pairs it fills.
    flat: The target flat state.

  Returns:
    Donor key -> {target key: new leaf} for each donor key that fills one
    split leaf with a whole copy; the others are left to the caller.

  Raises:
    DonorError: If the donor cannot be read.
    ValueError: If integers would wrap in the target's dtype.
  """
  out = {}
  for donor_key in sorted(targets):
    if len(targets[donor_key]) != 1:
      continue
    (key, plan), = targets[donor_key]
    indices = shard_indices(flat[key])
    if not plan.is_copy or indices is None:
      continue
    pieces = reader.read_slices(donor_key, indices)
    for piece in pieces:
      copy_plan.check_fits(key, piece, flat[key].dtype)
    out[donor_key] = {key: assemble(flat[key], indices, pieces)}
  return out


def whole_reads_note(reader: DonorReader,
                     sharded: Mapping[str, Mapping[str, jax.Array]]
                     ) -> str | None:
  """The report's note when a process read more than its shards.

  A tensor stored as one chunk is read whole; that reads more than the
  process's shards when the shards it holds are not the whole tensor (other
  processes hold the rest).

  Args:
    reader: The donor.
    sharded: What ``read_shards`` returned.

  Returns:
    A note with the count, the bytes beyond the shards and the fix, or None.
  """
  whole, extra = [], 0
  for donor_key, placed in sorted(sharded.items()):
    for leaf in placed.values():
      held = sum(int(np.prod([b - a for a, b in index]))
                 for index in shard_indices(leaf))
      if not reader.chunked(donor_key) and held < leaf.size:
        whole.append(donor_key)
        extra += (leaf.size - held) * leaf.dtype.itemsize
  if not whole:
    return None
  return (f'donor {reader.path}: {len(whole)} tensor(s) copied into sharded '
          f'leaves are stored as one chunk each (e.g. {whole[0]}), so each '
          f'process reads them whole: {extra} bytes beyond its shards; save '
          'the donor with orbax SaveArgs(chunk_byte_size=...) of at most a '
          'shard to read only the shards.')
