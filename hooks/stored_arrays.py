"""The arrays of an orbax PyTree item, read with tensorstore into host memory.

Orbax builds the tensorstore spec of each stored array and the context
(``ocp.type_handlers.get_json_tspec_read``, ``get_ts_context``); this module
opens one array at a time and reads it, whole or a set of slices (the shards
a process holds), straight into 64-byte aligned host buffers. XLA:CPU takes
such a buffer as the device buffer (``jax.device_put`` copies nothing), so
the host holds each value once. The context keeps one file-I/O and one copy
thread and no chunk cache (orbax's B-tree node cache stays), and glibc's
free memory is trimmed after each array of 4 MiB or more: the compressed
chunks tensorstore frees would otherwise stay resident. What glibc keeps in
the arenas of tensorstore's threads (a trim does not shrink them) remains:
about two or three compressed chunks, whatever the donor's size.
"""

from __future__ import annotations

import ctypes
import functools
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from hooks.readers import Index

__all__ = ['StoredArrays', 'aligned_empty']

# XLA:CPU's buffer alignment: a host buffer aligned so becomes the device's.
_ALIGN = 64
# Reads of arrays this large give their freed memory back to the system.
_TRIM_BYTES = 4 * 2**20


def aligned_empty(shape: Sequence[int], dtype: Any) -> np.ndarray:
  """An uninitialised C-order array whose data starts on a 64-byte boundary
  (unless it is empty: no data, no address to align)."""
  dtype = np.dtype(dtype)
  size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if not size:
    return np.empty(shape, dtype)
  raw = np.empty(size + _ALIGN, np.uint8)
  start = -raw.ctypes.data % _ALIGN
  return raw[start:start + size].view(dtype).reshape(tuple(shape))


@functools.cache
def _malloc_trim() -> Any:
  try:
    return ctypes.CDLL(None).malloc_trim  # glibc only.
  except (OSError, AttributeError):
    return None


def _release_free_memory() -> None:
  """Gives glibc's free heap pages back to the system (not the top of a
  thread's arena: glibc keeps that)."""
  trim = _malloc_trim()
  if trim is not None:
    trim(0)


def _chunk(store: ts.TensorStore) -> tuple[int, ...]:
  """The shape in which ``store`` is read (its read chunk, at most whole)."""
  chunk = store.chunk_layout.read_chunk.shape or store.shape
  return tuple(min(c, s) for c, s in zip(chunk, store.shape))


class StoredArrays:
  """The stored arrays of one orbax PyTree item directory.

  Args:
    item_dir: The item directory (``_METADATA``, the OCDBT database or one
      zarr directory per array).
    use_zarr3: Whether orbax wrote zarr3 (the item metadata's ``use_zarr3``).
  """

  def __init__(self, item_dir: str, use_zarr3: bool) -> None:
    self._dir = pathlib.Path(item_dir)
    self._zarr3 = bool(use_zarr3)
    self._ocdbt = bool(ocp.type_handlers.is_ocdbt_checkpoint(self._dir))
    self._context: ts.Context | None = None  # Made by the first read.
    self._big_read = False  # Whether the last read was of _TRIM_BYTES or more.

  def _open(self, name: str) -> ts.TensorStore:
    if self._context is None:
      self._context = ocp.type_handlers.get_ts_context(
          use_ocdbt=self._ocdbt, file_io_concurrency_limit=1,
          data_copy_concurrency_limit=1)
    info = ocp.type_handlers.ParamInfo(
        name=name, parent_dir=self._dir, use_zarr3=self._zarr3,
        ts_context=self._context)
    spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._ocdbt)
    return ts.open(spec, context=self._context, open=True, read=True).result()

  def read(self, name: str, indices: Sequence[Index] | None = None
           ) -> list[np.ndarray]:
    """Reads one stored array whole, or the parts ``indices`` of it.

    An array stored as one chunk is read once and sliced on the host:
    reading its slices one by one would decode the chunk for each.

    Args:
      name: orbax's name of the array (``params.Dense_0.kernel``, the
        ``name`` of its ``ArrayMetadata``).
      indices: Per part, ``(start, stop)`` on each axis; None for the whole
        array.

    Returns:
      The host arrays (the stored dtype), one per index or one in all.

    Raises:
      ValueError, FileNotFoundError: tensorstore's error (a missing or
        damaged file).
    """
    if self._big_read:  # What it freed late, in tensorstore's threads.
      _release_free_memory()
    store = self._open(name)
    nbytes = store.dtype.numpy_dtype.itemsize * store.size
    self._big_read = nbytes >= _TRIM_BYTES
    whole = indices is None or _chunk(store) == tuple(store.shape)
    try:
      if whole:
        value = self._into(store)
        if indices is None:
          return [value]
        return [value[tuple(slice(*i) for i in index)] for index in indices]
      return [self._into(store[tuple(slice(*i) for i in index)])
              for index in indices]
    finally:
      if self._big_read:  # A trim takes milliseconds: worth it after these.
        _release_free_memory()

  @staticmethod
  def _into(store: ts.TensorStore) -> np.ndarray:
    out = aligned_empty(store.shape, store.dtype.numpy_dtype)
    if out.ndim:  # Write by position: the slice's origin is not 0.
      store = store.translate_to[(0,) * out.ndim]
    ts.array(out, copy=False, write=True).write(store).result()
    return out
