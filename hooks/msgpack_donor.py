"""Flax msgpack donors: a file decoded whole, with no pickle.

``MsgpackReader`` reads a flax msgpack file (a TrainState, params, any dict
of arrays, a legacy ``flax.optim`` optimizer, flax's msgpack
``checkpoint_<n>``), decoded whole when opened: the format keeps no metadata
apart from the data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.serialization
import jax
import numpy as np

from hooks import flat as flat_lib
from hooks.readers import canonical
from hooks.readers import DonorError
from hooks.readers import Reader

__all__ = ['MsgpackReader']


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
