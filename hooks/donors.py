"""Donor checkpoints: read lazily, leaf by leaf, for warm starts.

``open_donor(path)`` returns a ``DonorReader`` (see ``hooks.api``) over

- an orbax run: a workdir (its latest step under ``checkpoints/``), a
  checkpoints directory, or one step directory (``.../checkpoints/<step>``)
  holding the items ``state`` and, optionally, ``meta`` (JSON with
  ``classes``). ``structure()`` reads only orbax metadata and ``read(keys)``
  restores only those leaves;
- a legacy flax msgpack file (``flax.serialization`` bytes, e.g. a
  ``flax.training.checkpoints`` file). The format has no separate metadata,
  so the first ``structure()`` or ``read`` reads the whole file.

Keys are those ``hooks.flatten_raw`` gives for the stored tree
(``params/Conv_0/kernel``, ``opt_state/inner_state/0/mu/...``, ``step``;
``target/...`` and ``state/...`` in a legacy ``flax.optim`` file). Dtypes are
the ones JAX would hold (``int64`` is ``int32`` unless x64 is enabled). Every
reader keeps a content hash of what it has read: ``digest()``.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging
import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp

from hooks import flat as flat_lib

__all__ = ['DonorError', 'MsgpackDonor', 'OrbaxDonor', 'open_donor']

_CHECKPOINTS = 'checkpoints'
_EXPECTED = (
    'expected an orbax workdir (with checkpoints/<step>/), a checkpoints '
    'directory, a step directory (<workdir>/checkpoints/<step>) or a flax '
    'msgpack file'
)


class DonorError(ValueError):
  """A donor path does not hold a checkpoint that can be read."""


def _canonical(dtype: Any) -> np.dtype:
  return np.dtype(jax.dtypes.canonicalize_dtype(dtype))


class _Digest:
  """sha256 over (key, dtype, shape, bytes) of every leaf read so far."""

  def __init__(self) -> None:
    self._parts: dict[str, str] = {}

  def add(self, key: str, value: np.ndarray) -> None:
    value = np.ascontiguousarray(value)
    # Hash the buffer in place: `tobytes()` would copy the whole tensor.
    data = hashlib.sha256(value.reshape(-1).view(np.uint8)).hexdigest()
    self._parts[key] = f'{key}\0{value.dtype.name}\0{value.shape}\0{data}\n'

  def hexdigest(self) -> str:
    h = hashlib.sha256()
    for key in sorted(self._parts):
      h.update(self._parts[key].encode())
    return h.hexdigest()


def _check_keys(
    path: str, keys: Sequence[str], known: Mapping[str, Any]
) -> list[str]:
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


class OrbaxDonor:
  """One step of an orbax ``CheckpointManager`` directory.

  Attributes:
    path: The path it was opened with.
    step: The checkpoint step read.
    classes: ``meta['classes']`` of that step, or None.
  """

  def __init__(self, path: str, ckpt_dir: str, step: int) -> None:
    self._path = path
    self.step = step
    self._manager = ocp.CheckpointManager(
        ckpt_dir,
        item_handlers={
            # StandardSave writes a PyTree checkpoint; the PyTree handler
            # restores it with placeholders, i.e. leaf by leaf.
            'state': ocp.PyTreeCheckpointHandler(),
            'config': ocp.JsonCheckpointHandler(),
            'meta': ocp.JsonCheckpointHandler(),
        },
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
    )
    step_dir = os.path.join(ckpt_dir, str(step))
    if not os.path.isdir(os.path.join(step_dir, 'state')):
      raise DonorError(
          f'Donor {path!r}: step {step} in {ckpt_dir} has no "state" item; '
          f'{_EXPECTED}.'
      )
    metadata = self._manager.item_metadata(step)['state']
    self._tree = getattr(metadata, 'tree', metadata)
    self._structure = {
        key: jax.ShapeDtypeStruct(tuple(leaf.shape), _canonical(leaf.dtype))
        for key, leaf in flat_lib.flatten(self._tree).items()
    }
    self._classes = self._read_classes(step_dir)
    self._digest = _Digest()

  def _read_classes(self, step_dir: str) -> tuple[int, ...] | None:
    if not os.path.isdir(os.path.join(step_dir, 'meta')):
      return None
    meta = self._manager.restore(
        self.step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
    )['meta']
    classes = (meta or {}).get('classes')
    return None if classes is None else tuple(int(c) for c in classes)

  @property
  def path(self) -> str:
    return self._path

  @property
  def classes(self) -> tuple[int, ...] | None:
    return self._classes

  def structure(self) -> dict[str, jax.ShapeDtypeStruct]:
    """Returns key -> shape/dtype of every stored leaf, from orbax metadata."""
    return dict(self._structure)

  def read(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Reads only ``keys``, as host ``np.ndarray``s.

    Every other leaf is an orbax placeholder, so its bytes are never read;
    the stored arrays are read whole, whatever topology wrote them.

    Args:
      keys: Keys of ``structure()``.

    Returns:
      Key -> array, for exactly ``keys``.

    Raises:
      DonorError: If a key is not in the checkpoint.
    """
    keys = _check_keys(self._path, keys, self._structure)
    if not keys:
      return {}
    wanted = set(keys)

    def item_leaf(path, leaf):
      if flat_lib.key_of(path) not in wanted:
        return ocp.PLACEHOLDER
      return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype)

    item = jax.tree_util.tree_map_with_path(item_leaf, self._tree)
    restore_args = jax.tree.map(
        lambda leaf: (
            ocp.PLACEHOLDER
            if leaf is ocp.PLACEHOLDER
            else ocp.RestoreArgs(restore_type=np.ndarray)
        ),
        item,
    )
    restored = self._manager.restore(
        self.step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args)
        ),
    )['state']
    flat = flat_lib.flatten(restored)
    out = {}
    for key in keys:
      value = np.asarray(flat[key])
      value = value.astype(self._structure[key].dtype, copy=False)
      self._digest.add(key, value)
      out[key] = value
    return out

  def digest(self) -> str:
    """Returns the sha256 (hex) over every leaf read so far.

    The hash covers, in key order, each key, dtype, shape and the sha256 of
    its bytes; the same leaves read in any order give the same digest.
    """
    return self._digest.hexdigest()

  def __repr__(self) -> str:
    return f'OrbaxDonor({self._path!r}, step={self.step})'


class MsgpackDonor:
  """A flax msgpack file (``flax.serialization.msgpack_serialize`` bytes).

  The format has no metadata apart from the data, so ``structure()`` reads
  (and keeps) the whole file; later reads use that copy. It is decoded with
  ``flax.serialization.msgpack_restore`` (never pickle).

  Attributes:
    path: The file.
    step: Always None: the file has no checkpoint step (a legacy optimizer
      keeps its own under ``state/step``).
    classes: Always None: the format records no labels.
  """

  def __init__(self, path: str) -> None:
    self._path = path
    self.step = None
    self._flat = self._load()
    self._structure = None
    self._digest = _Digest()

  def _load(self) -> dict[str, np.ndarray]:
    with open(self._path, 'rb') as f:
      data = f.read()
    try:
      tree = flax.serialization.msgpack_restore(data)
    except Exception as e:  # pylint: disable=broad-except
      raise DonorError(
          f'Donor {self._path!r} is a file but not flax msgpack '
          f'({type(e).__name__}: {e}); {_EXPECTED}.'
      ) from e
    if not isinstance(tree, dict) or not tree:
      raise DonorError(
          f'Donor {self._path!r} decodes to a {type(tree).__name__}, not a '
          f'non-empty dict of arrays; {_EXPECTED}.'
      )
    try:
      flat = flat_lib.flatten_raw(tree)
    except ValueError as e:
      raise DonorError(f'Donor {self._path!r}: {e}') from e
    out = {}
    for key, value in flat.items():
      value = np.asarray(value)
      if value.dtype == object or value.dtype.kind in 'USV':
        continue  # Strings and the like are not tensors.
      out[key] = value.astype(_canonical(value.dtype), copy=False)
    return out

  @property
  def path(self) -> str:
    return self._path

  @property
  def classes(self) -> tuple[int, ...] | None:
    return None

  def structure(self) -> dict[str, jax.ShapeDtypeStruct]:
    """Returns key -> shape/dtype of every leaf (the file was read whole)."""
    if self._structure is None:
      self._structure = {
          k: jax.ShapeDtypeStruct(v.shape, v.dtype)
          for k, v in self._flat.items()
      }
    return dict(self._structure)

  def read(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Returns ``keys`` from the file's contents.

    Args:
      keys: Keys of ``structure()``.

    Returns:
      Key -> array, for exactly ``keys``.

    Raises:
      DonorError: If a key is not in the file.
    """
    keys = _check_keys(self._path, keys, self._flat)
    for key in keys:
      self._digest.add(key, self._flat[key])
    return {key: self._flat[key] for key in keys}

  def digest(self) -> str:
    """Returns the sha256 (hex) over every leaf read so far (see OrbaxDonor)."""
    return self._digest.hexdigest()

  def __repr__(self) -> str:
    return f'MsgpackDonor({self._path!r})'


def _steps(ckpt_dir: str) -> list[int]:
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(ocp.path.step.checkpoint_steps(ckpt_dir))


def _step_of(name: str) -> int | None:
  try:
    return ocp.path.step.step_from_checkpoint_name(name)
  except ValueError:
    return None


def _latest(path: str, ckpt_dir: str, what: str) -> OrbaxDonor:
  steps = _steps(ckpt_dir)
  if not steps:
    raise DonorError(
        f'Donor {path!r}: {what} {ckpt_dir} holds no finished checkpoint '
        f'step; {_EXPECTED}.'
    )
  return OrbaxDonor(path, ckpt_dir, steps[-1])


def open_donor(path: str) -> OrbaxDonor | MsgpackDonor:
  """Opens a donor checkpoint for lazy reading.

  Args:
    path: An orbax workdir (the latest step of ``<path>/checkpoints`` is
      used), a checkpoints directory (its latest step), a step directory
      ``<workdir>/checkpoints/<step>``, or a flax msgpack file.

  Returns:
    An ``OrbaxDonor`` or a ``MsgpackDonor`` (both ``hooks.DonorReader``s with
    ``digest()``).

  Raises:
    DonorError: If nothing is at ``path``, a directory holds no finished
      orbax checkpoint, or a file is not flax msgpack.
  """
  # orbax reads absolute paths only; '~' is the user's, as on a shell.
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if not os.path.exists(path):
    raise DonorError(f'Donor {path!r} does not exist; {_EXPECTED}.')
  if os.path.isfile(path):
    donor = MsgpackDonor(path)
  elif os.path.isdir(os.path.join(path, _CHECKPOINTS)):
    donor = _latest(path, os.path.join(path, _CHECKPOINTS), 'its directory')
  else:
    parent, name = os.path.split(os.path.normpath(path))
    step = _step_of(name)
    if step is not None and step in _steps(parent):
      donor = OrbaxDonor(path, parent, step)
    else:
      donor = _latest(path, path, 'the directory')
  logging.info('Donor %s: %r, classes %s.', path, donor, donor.classes)
  return donor

