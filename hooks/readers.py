"""Donor readers: one checkpoint's tensors, read lazily, and what was read.

``Reader`` holds what every reader shares (the ``DonorReader`` attributes,
key checks, the digest, provenance). The readers are
``hooks.orbax_donor.OrbaxReader`` and ``hooks.msgpack_donor.MsgpackReader``.
A tensor is read whole (``read``) or as the parts a process holds of it
(``read_slices``: the shards of a sharded target).

Keys are those ``hooks.flatten_raw`` gives for the stored tree. Dtypes are the
ones JAX would hold (``int64`` is ``int32`` unless x64 is enabled).
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np

__all__ = ['DonorError', 'DonorReader', 'Index', 'Reader', 'canonical',
           'check_keys', 'damaged']

# A part of a tensor: per axis, [start, stop).
Index = tuple[tuple[int, int], ...]


class DonorError(ValueError):
  """A donor path does not hold a checkpoint that can be read."""


@runtime_checkable
class DonorReader(Protocol):
  """A checkpoint to copy from, read lazily (see ``hooks.open_donor``)."""

  path: str  # The absolute path opened.
  form: str  # What was found there, e.g. 'orbax-manager-step'.
  step: int | None  # The checkpoint step, when the checkpoint names one.
  item: str | None  # The CheckpointManager item read, if any.
  metadata: dict[str, Any]  # JSON items of the same step, by item name.

  def structure(self) -> dict[str, jax.ShapeDtypeStruct]:
    """Returns key -> shape/dtype of every stored tensor."""

  def read(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Reads exactly ``keys``."""

  def read_slices(self, key: str, indices: Sequence[Index]
                  ) -> list[np.ndarray]:
    """Reads the parts ``indices`` of the tensor ``key``."""

  def chunked(self, key: str) -> bool:
    """Whether ``key`` is stored in chunks smaller than the tensor."""

  def digest(self) -> str:
    """Returns the sha256 (hex) of what was read so far."""

  def provenance(self) -> dict[str, Any]:
    """Returns path, form, step, item, sha256 and keys_read."""


def canonical(dtype: Any) -> np.dtype:
  """The dtype JAX would hold for ``dtype`` (int64 -> int32 under x32)."""
  return np.dtype(jax.dtypes.canonicalize_dtype(dtype))


def damaged(path: str, step_dir: str, what: str) -> DonorError:
  """The error for a checkpoint whose files cannot be read: what to do."""
  return DonorError(
      f'Donor {path!r}: the checkpoint step directory {step_dir} is damaged: '
      f'{what}. Pick another step (donor_step= in a hook entry, step= for '
      'hooks.open_donor), or re-save this checkpoint.')


def _sha(value: np.ndarray) -> str:
  value = np.ascontiguousarray(value)
  # Hash the buffer in place: `tobytes()` would copy the whole tensor.
  return hashlib.sha256(value.reshape(-1).view(np.uint8)).hexdigest()


def _hash_leaf(key: str, value: np.ndarray) -> str:
  return f'{key}\0{value.dtype.name}\0{value.shape}\0{_sha(value)}\n'


def _hash_parts(key: str, shape: tuple[int, ...], parts: Mapping[Index, Any]
                ) -> str:
  """A tensor read in parts: each part's index and sha256, in index order."""
  dtype = next(iter(parts.values())).dtype.name
  data = ';'.join(f'{index}:{_sha(parts[index])}' for index in sorted(parts))
  return f'{key}\0{dtype}\0{shape}\0parts\0{data}\n'


def check_keys(
    path: str, keys: Sequence[str], known: Mapping[str, Any]
) -> list[str]:
  """``keys`` without repeats; raises DonorError (did-you-mean) for unknown."""
  if isinstance(keys, str):
    raise DonorError(f'read() takes a list of keys, got the string {keys!r}.')
  keys = list(dict.fromkeys(keys))
  unknown = [k for k in keys if k not in known]
  if unknown:
    lines = []
    for k in unknown:
      close = difflib.get_close_matches(k, list(known), n=3, cutoff=0.5)
      lines.append(f'  {k}' + (f'  (did you mean {close}?)' if close else ''))
    raise DonorError(
        f'Donor {path!r} has no key(s):\n' + '\n'.join(lines) +
        f'\nIt has {len(known)} keys, e.g. {sorted(known)[:5]}.'
    )
  return keys


class Reader:
  """What every reader shares: attributes, key checks, digest, provenance.

  A subclass passes the ``DonorReader`` attributes and its structure, and
  implements ``_read(keys)`` (key -> array, for at least ``keys``).
  """

  def __init__(self, path: str, form: str, step: int | None,
               item: str | None, metadata: dict[str, Any],
               structure: dict[str, jax.ShapeDtypeStruct]) -> None:
    self.path, self.form, self.step, self.item = path, form, step, item
    self.metadata = metadata
    self._structure = structure
    self._hashed: dict[str, str] = {}

  def structure(self) -> dict[str, jax.ShapeDtypeStruct]:
    """Returns key -> shape/dtype of every stored tensor."""
    return dict(self._structure)

  def read(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Reads exactly ``keys``, as host ``np.ndarray``s.

    Args:
      keys: Keys of ``structure()``.

    Returns:
      Key -> array, for exactly ``keys``, in the dtypes of ``structure()``.

    Raises:
      DonorError: If a key is not in the checkpoint, or its data cannot be
        read (a damaged checkpoint).
    """
    keys = check_keys(self.path, keys, self._structure)
    if not keys:
      return {}
    raw = self._read(keys)
    out = {}
    for key in keys:
      value = np.asarray(raw[key]).astype(self._structure[key].dtype,
                                          copy=False)
      self._hashed[key] = _hash_leaf(key, value)
      out[key] = value
    return out

  def _read(self, keys: list[str]) -> Mapping[str, Any]:
    raise NotImplementedError

  def read_slices(self, key: str, indices: Sequence[Index]
                  ) -> list[np.ndarray]:
    """Reads the parts ``indices`` of one tensor, as host ``np.ndarray``s.

    Only the stored chunks that hold a part are read (``chunked``); a
    tensor stored as one chunk is read whole once.

    Args:
      key: A key of ``structure()``.
      indices: Per part, ``(start, stop)`` on each axis, e.g. the shards of
        a sharded target that this process holds.

    Returns:
      One array per index, in the dtype of ``structure()``.

    Raises:
      DonorError: As for ``read``.
    """
    key, = check_keys(self.path, [key], self._structure)
    indices = [tuple(tuple(int(i) for i in axis) for axis in index)
               for index in indices]
    dtype = self._structure[key].dtype
    parts = [np.asarray(part).astype(dtype, copy=False)
             for part in self._read_slices(key, indices)]
    self._hashed[key] = _hash_parts(key, tuple(self._structure[key].shape),
                                    dict(zip(indices, parts)))
    return parts

  def _read_slices(self, key: str, indices: list[Index]) -> list[Any]:
    value = self._read([key])[key]
    return [value[tuple(slice(*axis) for axis in index)] for index in indices]

  def chunked(self, key: str) -> bool:
    """Whether ``key`` is stored in chunks smaller than the tensor, so that
    ``read_slices`` reads only the chunks of its parts."""
    del key
    return False

  def digest(self) -> str:
    """Returns the sha256 (hex) over every leaf read so far.

    The hash covers, in key order, each key, dtype, shape and the sha256 of
    its bytes: the same leaves read in any order, from any form, give the
    same digest. A tensor read in parts (``read_slices``) contributes each
    part's index and sha256 instead.
    """
    h = hashlib.sha256()
    for key in sorted(self._hashed):
      h.update(self._hashed[key].encode())
    return h.hexdigest()

  def provenance(self) -> dict[str, Any]:
    """Returns ``{'path', 'form', 'step', 'item', 'sha256', 'keys_read'}``."""
    return {'path': self.path, 'form': self.form, 'step': self.step,
            'item': self.item,
            'sha256': self.digest() if self._hashed else None,  # None: no read.
            'keys_read': sorted(self._hashed)}

  def __repr__(self) -> str:
    return (f'{type(self).__name__}({self.path!r}, form={self.form!r}, '
            f'step={self.step}, item={self.item!r})')
