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


def _arrays(flat: Mapping[str, Any]
            ) -> tuple[dict[str, np.ndarray], dict[str, jax.ShapeDtypeStruct]]:
  """The numeric leaves as arrays of canonical dtypes, and their structure.

  Per leaf type and dtype, the checks run once; leaves of one shape and
  dtype share a ``ShapeDtypeStruct`` (building one costs microseconds).
  """
  arrays, structure = {}, {}
  wanted: dict[np.dtype, np.dtype | None] = {}  # None: not a tensor.
  structs: dict[tuple[Any, np.dtype], jax.ShapeDtypeStruct] = {}
  for key, value in flat.items():
    if type(value) is not np.ndarray:  # pylint: disable=unidiomatic-typecheck
      value = np.asarray(value)  # Python and numpy scalars.
    dtype = value.dtype
    if dtype not in wanted:  # Strings and the like are not tensors.
      wanted[dtype] = (None if dtype == object or dtype.kind in 'USV'
                       else canonical(dtype))
    want = wanted[dtype]
    if want is None:
      continue
    if want != dtype:
      value = value.astype(want)
    arrays[key] = value
    struct = structs.get((value.shape, want))
    if struct is None:
      struct = structs[value.shape, want] = jax.ShapeDtypeStruct(
          value.shape, want)
    structure[key] = struct
  return arrays, structure


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
      flat = flat_lib.flatten(tree)  # flatten_raw's keys; arrays below.
    except ValueError as e:
      raise DonorError(f'Donor {path!r}: {e}') from e
    self._flat, structure = _arrays(flat)
    if not self._flat:
      raise DonorError(
          f'Donor {path!r}: the file {file} holds no arrays; expected the '
          'msgpack of a TrainState, its params or a flax.optim optimizer.')
    form = 'flax-optim-msgpack' if _is_flax_optim(tree) else 'flax-msgpack'
    if step is None:  # The file's name gives none: a flax.optim file's own.
      step = _stored_step(tree)
    super().__init__(path, form, step, None, {}, structure)

  def _read(self, keys: list[str]) -> Mapping[str, Any]:
    return self._flat
