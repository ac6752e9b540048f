"""Donor readers: one checkpoint's tensors, read lazily, and what was read.

``Reader`` holds what every reader shares (the ``DonorReader`` attributes,
key checks, the digest, provenance); ``MsgpackReader`` reads a flax msgpack
file, decoded whole when opened (the format keeps no metadata apart from the
data). The orbax reader is ``hooks.orbax_donor.OrbaxReader``.

Keys are those ``hooks.flatten_raw`` gives for the stored tree. Dtypes are the
ones JAX would hold (``int64`` is ``int32`` unless x64 is enabled).
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import flax.serialization
import jax
import numpy as np

from hooks import flat as flat_lib

__all__ = ['DonorError', 'DonorReader', 'MsgpackReader', 'Reader', 'canonical',
           'check_keys', 'damaged']


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


def _hash_leaf(key: str, value: np.ndarray) -> str:
  value = np.ascontiguousarray(value)
  # Hash the buffer in place: `tobytes()` would copy the whole tensor.
  data = hashlib.sha256(value.reshape(-1).view(np.uint8)).hexdigest()
  return f'{key}\0{value.dtype.name}\0{value.shape}\0{data}\n'


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

  def digest(self) -> str:
    """Returns the sha256 (hex) over every leaf read so far.

    The hash covers, in key order, each key, dtype, shape and the sha256 of
    its bytes: the same leaves read in any order, from any form, give the
    same digest.
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


def _is_flax_optim(tree: Mapping[str, Any]) -> bool:
  state = tree.get('state')
  return (set(tree) == {'target', 'state'} and isinstance(state, Mapping)
          and 'param_states' in state)


def _stored_step(tree: Mapping[str, Any]) -> int | None:
  """The integer step a legacy flax.optim file holds (``state/step``)."""
  if not _is_flax_optim(tree):
    return None
  value = np.asarray(tree['state'].get('step'))
  if value.ndim or value.dtype.kind not in 'iu':
    return None
  return int(value)


class MsgpackReader(Reader):
  """A flax msgpack file, decoded whole with ``msgpack_restore`` (no pickle).

  ``form`` is ``'flax-optim-msgpack'`` for a legacy ``flax.optim`` optimizer
  (``{'target', 'state': {'step', 'param_states'}}``), else
  ``'flax-msgpack'`` (a TrainState, params, any dict of arrays).

  Args:
    path: The path the donor was opened with.
    file: The msgpack file.
    step: The checkpoint step its name gives (``checkpoint_7``), or None:
      then a legacy ``flax.optim`` file's ``state/step``.
  """

  def __init__(self, path: str, file: str, step: int | None = None) -> None:
    with open(file, 'rb') as f:
      data = f.read()
    try:
      tree = flax.serialization.msgpack_restore(data)
    except Exception as e:  # pylint: disable=broad-except
      raise DonorError(
          f'Donor {path!r}: the file {file} is not flax msgpack '
          f'({type(e).__name__}: {e}); expected a flax msgpack file '
          '(flax.serialization.to_bytes or a flax checkpoint file), or '
          're-save it if it was cut short.') from None
    if not isinstance(tree, dict) or not tree:
      raise DonorError(
          f'Donor {path!r}: the file {file} decodes to a '
          f'{type(tree).__name__}, not a non-empty dict of arrays; expected '
          'the msgpack of a TrainState, its params or a flax.optim '
          'optimizer.')
    try:
      flat = flat_lib.flatten_raw(tree)
    except ValueError as e:
      raise DonorError(f'Donor {path!r}: {e}') from e
    self._flat = {}
    for key, value in flat.items():
      value = np.asarray(value)
      if value.dtype == object or value.dtype.kind in 'USV':
        continue  # Strings and the like are not tensors.
      self._flat[key] = value.astype(canonical(value.dtype), copy=False)
    if not self._flat:
      raise DonorError(
          f'Donor {path!r}: the file {file} holds no arrays; expected the '
          'msgpack of a TrainState, its params or a flax.optim optimizer.')
    form = 'flax-optim-msgpack' if _is_flax_optim(tree) else 'flax-msgpack'
    if step is None:  # The file's name gives none: a flax.optim file's own.
      step = _stored_step(tree)
    structure = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                 for k, v in self._flat.items()}
    super().__init__(path, form, step, None, {}, structure)

  def _read(self, keys: list[str]) -> Mapping[str, Any]:
    return self._flat
