"""Orbax donors: what orbax wrote in a directory, and a lazy reader of it.

Everything is read through orbax's public API: ``ocp.PyTreeCheckpointer()
.metadata(dir)`` gives a directory's ``item_handlers`` (from its
``_CHECKPOINT_METADATA``: a dict of item names for a CheckpointManager step,
a string for a single-item directory, None otherwise) and its tree metadata
(a PyTree item's ``_METADATA``; None for a whole step). ``OrbaxReader``
reads only the tensors, or the parts of tensors, asked for.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from hooks import flat as flat_lib
from hooks import nnx_donor
from hooks import ocdbt
from hooks import stored_arrays
from hooks.readers import canonical
from hooks.readers import damaged
from hooks.readers import DonorError
from hooks.readers import Index
from hooks.readers import Reader

__all__ = ['OrbaxReader', 'TENSOR_FORMS', 'handler_name', 'metadata',
           'pick_item', 'read_json', 'step_of', 'steps']

# The handlers whose items are trees of tensors, and the form each names.
TENSOR_FORMS = {
    ocp.StandardCheckpointHandler.__name__: 'orbax-standard',
    ocp.PyTreeCheckpointHandler.__name__: 'orbax-pytree',
}
_JSON = ocp.JsonCheckpointHandler.__name__


def handler_name(handler: Any) -> str:
  """``'StandardCheckpointHandler'`` for orbax's recorded handler path."""
  return str(handler).rsplit('.', 1)[-1] if handler else str(handler)


def step_of(name: str) -> int | None:
  """The step orbax's and flax's names give (``7``, ``checkpoint_7``)."""
  if name.isdigit():
    return int(name)
  match = re.fullmatch(ocp.path.step.ALLOWED_STEP_NAME_PATTERN, name)
  return int(match.group(2)) if match else None


def _cause(e: Exception) -> str:
  """One line of an orbax or tensorstore error, for a message."""
  line = (str(e).strip().splitlines() or [''])[0][:300]
  return f'{type(e).__name__}: {line}'


class _QuietProbe(logging.Filter):
  """Drops orbax's warnings about a directory holding no checkpoint.

  Detection asks orbax for the metadata of directories that may not be
  checkpoints (a workdir, a root); that is an answer, not a problem.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not ('Failed to get item metadata' in message
                or 'Metadata file does not exist' in message)


def metadata(path: str, directory: str) -> Any:
  """``StepMetadata`` of ``directory``: ``item_handlers``, ``item_metadata``.

  Args:
    path: The donor path, for messages.
    directory: Any directory; one orbax did not write gives None for both.

  Returns:
    orbax's ``StepMetadata``.

  Raises:
    DonorError: If orbax's metadata files there cannot be read.
  """
  quiet = _QuietProbe()
  logger = logging.getLogger('absl')
  logger.addFilter(quiet)
  try:
    return ocp.PyTreeCheckpointer().metadata(directory)
  except Exception as e:  # pylint: disable=broad-except
    raise damaged(path, directory,
                  f'its orbax metadata cannot be read ({_cause(e)})') from None
  finally:
    logger.removeFilter(quiet)


def steps(path: str, directory: str, files: bool) -> dict[int, str]:
  """Step -> entry of the step-named checkpoints in ``directory``.

  Args:
    path: The donor path, for messages.
    directory: A checkpoint root, or any directory.
    files: Whether step-named files count (flax msgpack ``checkpoint_<n>``).

  Returns:
    Step -> path of each entry named ``<n>`` or ``<prefix>_<n>`` that orbax
    marked as a checkpoint (or, with ``files``, that is a file).

  Raises:
    DonorError: If two entries name the same step.
  """
  found: dict[int, str] = {}
  for entry in sorted(os.scandir(directory), key=lambda e: e.name):
    step = step_of(entry.name)
    if step is None:
      continue
    if entry.is_dir():
      try:
        if metadata(path, entry.path).item_handlers is None:
          continue  # A directory orbax did not mark as a checkpoint.
      except DonorError:
        pass  # A damaged step: opening it says so.
    elif not (files and entry.is_file()):
      continue
    if step in found:
      raise DonorError(
          f'Donor {path!r}: {directory} holds two checkpoints of step '
          f'{step}: {found[step]} and {entry.path}; pass the one you mean.')
    found[step] = entry.path
  return found


def pick_item(path: str, step_dir: str, handlers: Mapping[str, Any],
              item: str | None) -> tuple[str, list[str]]:
  """The tensor item to read and the JSON items of a CheckpointManager step.

  Args:
    path: The donor path, for messages.
    step_dir: The step directory.
    handlers: Its ``item_handlers`` (item name -> handler).
    item: The item asked for, or None for the only tensor item.

  Returns:
    The tensor item's name and the names of the JSON items.

  Raises:
    DonorError: If there is no tensor item, several and no ``item``, or
      ``item`` is not a tensor item.
  """
  kinds = {name: handler_name(h) for name, h in sorted(handlers.items())}
  tensors = [name for name, kind in kinds.items() if kind in TENSOR_FORMS]
  jsons = [name for name, kind in kinds.items() if kind == _JSON]
  where = f'the CheckpointManager step {step_dir}'
  if item is None and len(tensors) == 1:
    return tensors[0], jsons
  if item is None and not tensors:
    raise DonorError(
        f'Donor {path!r}: {where} has no tensor item (its items: {kinds}); '
        'expected an item saved with ocp.args.StandardSave or PyTreeSave.')
  if item is None:
    raise DonorError(
        f'Donor {path!r}: {where} has {len(tensors)} tensor items {tensors}; '
        'pass item= with the one to read.')
  if item not in tensors:
    what = 'a JSON item' if item in jsons else 'not an item'
    close = difflib.get_close_matches(item, tensors, n=1, cutoff=0.5)
    hint = f' (did you mean {close[0]!r}?)' if close else ''
    raise DonorError(
        f'Donor {path!r}: item={item!r} is {what} of {where}{hint}; its '
        f'tensor items are {tensors}.')
  return item, jsons


def read_json(path: str, step_dir: str, names: list[str]) -> dict[str, Any]:
  """Reads the (small) JSON items ``names`` of a CheckpointManager step."""
  if not names:
    return {}
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  try:
    restored = checkpointer.restore(step_dir, args=ocp.args.Composite(
        **{name: ocp.args.JsonRestore() for name in names}))
  except Exception as e:  # pylint: disable=broad-except
    raise damaged(path, step_dir, f'reading its JSON items {names} failed '
                  f'({_cause(e)})') from None
  finally:
    checkpointer.close()
  return {name: restored[name] for name in names}


class OrbaxReader(Reader):
  """One orbax PyTree item directory, read tensor by tensor, whole or the
  parts asked for, with tensorstore (``hooks.stored_arrays``).

  Args:
    path: The path the donor was opened with.
    form: What was found there; ``nnx_donor.FORM`` for an ``nnx.State``.
    item_dir: The directory of the PyTree item (``_METADATA`` and data).
    tree: Its orbax tree metadata (``metadata(item_dir).item_metadata``).
    step_dir: The checkpoint step directory, named in errors.
    step, item, metadata: See ``DonorReader``.

  Raises:
    DonorError: If the tree metadata lists no tensors.
  """

  def __init__(self, path: str, form: str, item_dir: str, tree: Any, *,
               step_dir: str, step: int | None = None,
               item: str | None = None,
               metadata: dict[str, Any] | None = None) -> None:
    leaves = {key: leaf for key, leaf
              in flat_lib.flatten(getattr(tree, 'tree', tree)).items()
              if getattr(leaf, 'shape', None) is not None}  # Not a string.
    structure = {key: jax.ShapeDtypeStruct(tuple(v.shape), canonical(v.dtype))
                 for key, v in leaves.items()}
    if not structure:
      # orbax gives an empty tree, silently, for e.g. a whole step directory.
      raise DonorError(
          f'Donor {path!r}: the orbax item {item_dir} lists no tensors in its '
          'metadata; expected a checkpoint of arrays (a TrainState or params).')
    form = nnx_donor.FORM if nnx_donor.is_nnx_state(structure) else form
    super().__init__(path, form, step, item, metadata or {}, structure)
    self._item_dir, self._step_dir = item_dir, step_dir
    self._names = {key: leaf.name for key, leaf in leaves.items()}  # Stored.
    self._chunks = {key: tuple(getattr(getattr(leaf, 'storage', None),
                                       'chunk_shape', None) or leaf.shape)
                    for key, leaf in leaves.items()}
    self._arrays = stored_arrays.StoredArrays(
        item_dir, getattr(tree, 'use_zarr3', False))

  def chunked(self, key: str) -> bool:
    """Whether orbax stored ``key`` in chunks smaller than the tensor."""
    return self._chunks[key] != tuple(self._structure[key].shape)

  def _stored(self, key: str, indices: list[Index] | None) -> list[Any]:
    try:
      return self._arrays.read(self._names[key], indices)
    except Exception as e:  # pylint: disable=broad-except
      # No tensorstore traceback: the checkpoint, not the caller, is at fault.
      raise damaged(self.path, self._step_dir,
                    f'reading {key} ({self._names[key]}) of {self._item_dir} '
                    f'failed ({_cause(e)})') from None

  def _read(self, keys: list[str]) -> Mapping[str, Any]:
    # A read of a damaged item can succeed: check the raw bytes first.
    try:
      ocdbt.check_values(self._item_dir, keys)
    except Exception as e:  # pylint: disable=broad-except
      raise damaged(self.path, self._step_dir,
                    f'{self._item_dir} ({_cause(e)})') from None
    return {key: self._stored(key, None)[0] for key in keys}  # One by one.

  def _read_slices(self, key: str, indices: list[Index]) -> list[Any]:
    return self._stored(key, indices)
