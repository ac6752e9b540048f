"""Donor checkpoints: found from what orbax or flax wrote, read lazily.

``open_donor(path, item=None, step=None)`` looks at what is at ``path``:

- a directory orbax marked as a checkpoint (``ocp.PyTreeCheckpointer()
  .metadata(dir).item_handlers``, from its ``_CHECKPOINT_METADATA``):
  a dict of item names is a CheckpointManager step, read through its one
  tensor item (``StandardSave`` or ``PyTreeSave``; ``item=`` picks one of
  several) with its JSON items in ``reader.metadata``; a string is a
  single-item directory (``StandardCheckpointer``, ``PyTreeCheckpointer``,
  flax's orbax ``save_checkpoint``);
- an item directory inside a step (tree metadata, no item handlers);
- a checkpoint root: a directory whose entries are steps (``<n>`` or
  ``<prefix>_<n>``: orbax checkpoint directories or flax msgpack files); the
  latest step, or ``step=``;
- any other directory holding exactly one CheckpointManager root among its
  immediate subdirectories (a training workdir): read through that root;
- a file: flax msgpack (a TrainState, params, a legacy ``flax.optim``
  optimizer, flax's msgpack ``checkpoint_<n>``).

Orbax forms read only the tensors asked for, or only the parts asked for
(``hooks.orbax_donor``); msgpack files are decoded whole
(``hooks.msgpack_donor``). An orbax tree whose every key ends with
``/value`` is an ``nnx.state`` (form ``'orbax-nnx-state'``): copy hooks read
it under the target's names (``hooks.nnx_donor``).
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging

from hooks import orbax_donor
from hooks.msgpack_donor import MsgpackReader
from hooks.orbax_donor import OrbaxReader
from hooks.readers import damaged
from hooks.readers import DonorError
from hooks.readers import DonorReader

__all__ = ['DonorError', 'DonorReader', 'open_donor']

_EXPECTED = (
    'expected an orbax CheckpointManager directory or one of its steps, a '
    'StandardCheckpointer or PyTreeCheckpointer directory, a directory '
    'holding one CheckpointManager directory (e.g. a workdir), or a flax '
    'msgpack file'
)


def _check_step(path: str, where: str, own: int | None,
                step: int | None) -> None:
  if step is not None and step != own:
    has = f'of step {own}' if own is not None else 'with no step number'
    raise DonorError(
        f'Donor {path!r}: step={step} was asked for, but {where} is one '
        f'checkpoint {has}; step= picks a step of a checkpoint root (the '
        'directory that holds the steps).')


def _check_item(path: str, where: str, own: str | None,
                item: str | None) -> None:
  if item is not None and item != own:
    raise DonorError(
        f'Donor {path!r}: item={item!r} was asked for, but {where} is a '
        f'single-item checkpoint (item {own!r}); item= picks an item of a '
        'CheckpointManager step.')


def _open_step(path: str, step_dir: str, handlers: dict[str, Any],
               item: str | None) -> OrbaxReader:
  item, jsons = orbax_donor.pick_item(path, step_dir, handlers, item)
  item_dir = os.path.join(step_dir, item)
  tree = orbax_donor.metadata(path, item_dir).item_metadata
  if tree is None:
    raise damaged(path, step_dir, f'its item {item!r} has no tree metadata')
  return OrbaxReader(
      path, 'orbax-manager-step', item_dir, tree, step_dir=step_dir,
      step=orbax_donor.step_of(os.path.basename(step_dir)), item=item,
      metadata=orbax_donor.read_json(path, step_dir, jsons))


def _open_item(path: str, item_dir: str, tree: Any, item: str | None,
               step: int | None) -> OrbaxReader:
  """An item directory; inside a step, it takes the step's JSON items."""
  step_dir, name = os.path.split(item_dir)
  handlers = orbax_donor.metadata(path, step_dir).item_handlers
  if not isinstance(handlers, dict) or name not in handlers:
    _check_item(path, item_dir, None, item)
    _check_step(path, item_dir, None, step)
    return OrbaxReader(path, 'orbax-pytree', item_dir, tree, step_dir=item_dir)
  _check_item(path, item_dir, name, item)
  own = orbax_donor.step_of(os.path.basename(step_dir))
  _check_step(path, item_dir, own, step)
  jsons = orbax_donor.pick_item(path, step_dir, handlers, name)[1]
  return OrbaxReader(path, 'orbax-item', item_dir, tree, step_dir=step_dir,
                     step=own, item=name,
                     metadata=orbax_donor.read_json(path, step_dir, jsons))


def _open_root(path: str, root: str, steps: dict[int, str], item: str | None,
               step: int | None) -> DonorReader:
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise DonorError(
        f'Donor {path!r}: {root} has no checkpoint of step {step}; its '
        f'steps are {sorted(steps)}.')
  entry = steps[step]
  if os.path.isfile(entry):
    _check_item(path, entry, None, item)
    return MsgpackReader(path, entry, step)
  return _open_dir(path, entry, item, step)


def _open_dir(path: str, directory: str, item: str | None,
              step: int | None) -> DonorReader:
  found = orbax_donor.metadata(path, directory)
  handlers, tree = found.item_handlers, found.item_metadata
  own = orbax_donor.step_of(os.path.basename(directory))
  if isinstance(handlers, dict):
    _check_step(path, directory, own, step)
    return _open_step(path, directory, handlers, item)
  if handlers is not None:
    name = orbax_donor.handler_name(handlers)
    form = orbax_donor.TENSOR_FORMS.get(name)
    if form is None:
      raise DonorError(
          f'Donor {path!r}: {directory} is a single-item orbax checkpoint '
          f'written by {name}, not a tree of tensors; {_EXPECTED}.')
    _check_item(path, directory, None, item)
    _check_step(path, directory, own, step)
    if tree is None:
      raise damaged(path, directory, 'it has no tree metadata (_METADATA)')
    return OrbaxReader(path, form, directory, tree, step_dir=directory,
                       step=own)
  if tree is not None:
    return _open_item(path, directory, tree, item, step)
  steps = orbax_donor.steps(path, directory, files=True)
  if steps:
    return _open_root(path, directory, steps, item, step)
  subdirs = sorted(e.path for e in os.scandir(directory) if e.is_dir())
  roots = {d: s for d in subdirs
           if (s := orbax_donor.steps(path, d, files=False))}
  if len(roots) == 1:
    (root, steps), = roots.items()
    return _open_root(path, root, steps, item, step)
  if roots:
    raise DonorError(
        f'Donor {path!r} holds {len(roots)} CheckpointManager directories '
        f'{[os.path.basename(r) for r in roots]}; pass the one you mean as '
        'the path.')
  raise DonorError(
      f'Donor {path!r}: found no checkpoint in {directory}: orbax did not '
      'mark it as a checkpoint, it holds no checkpoint steps (<n> or '
      '<prefix>_<n>), and none of its subdirectories is a CheckpointManager '
      f'directory; {_EXPECTED}.')


def open_donor(path: str | os.PathLike[str], *, item: str | None = None,
               step: int | None = None) -> DonorReader:
  """Opens a donor checkpoint for lazy reading, whatever wrote it.

  Args:
    path: A checkpoint as orbax or flax wrote it (see the module docstring):
      a CheckpointManager directory or step, a single-item orbax directory,
      an item directory, a directory holding one CheckpointManager directory,
      or a flax msgpack file.
    item: The CheckpointManager item to read, when a step has several tensor
      items.
    step: The step to read from a checkpoint root (default: the latest).

  Returns:
    A ``DonorReader`` (``path``, ``form``, ``step``, ``item``, ``metadata``,
    ``structure()``, ``read(keys)``, ``digest()``, ``provenance()``); an
    ``nnx.state`` checkpoint has its stored keys (``Conv_0/kernel/value``).

  Raises:
    DonorError: If nothing readable is at ``path``, the choice is ambiguous
      (several tensor items or roots), ``item``/``step`` is not there, or
      the checkpoint is damaged.
  """
  # orbax reads absolute paths only; '~' is the user's, as on a shell.
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if not os.path.exists(path):
    raise DonorError(f'Donor {path!r} does not exist; {_EXPECTED}.')
  if os.path.isfile(path):
    own = orbax_donor.step_of(os.path.basename(path))
    _check_item(path, path, None, item)
    _check_step(path, path, own, step)
    reader = MsgpackReader(path, path, own)
  else:
    reader = _open_dir(path, path, item, step)
  # Debug only: what a run does with a donor names it once (a hook's line,
  # the report's source line).
  logging.debug('Donor %s: %r.', path, reader)
  return reader
