"""NNX donors: an orbax checkpoint of ``nnx.state`` read under Linen names.

Flax's NNX guides save ``nnx.state(model)`` (or ``nnx.state(model,
nnx.Param)``), ``nnx.state(optimizer)``, or a dict of them such as
``{'model': ..., 'optimizer': ...}``, with orbax. Each stored tensor is a
variable's ``value`` (``Conv_0/kernel/value``,
``opt_state/0/mu/Conv_0/kernel/value``, ``step/value``), and no variable's
collection is stored. ``hooks.open_donor`` calls such a checkpoint (every
stored tensor's key ends with ``/value``) ``'orbax-nnx-state'``, and ``view``
gives it the names of the target's flat view (``hooks.nnx_state``):

- ``/value`` is dropped;
- the optimizer part (``step`` and ``opt_state/...``) loses what holds it
  (``optimizer/`` in a dict); its slots already end with their param's path;
- a model variable ``X`` takes the collection of the target keys that read
  it (target ``<collection>/P`` reads ``P``, or what a rename rule makes of
  ``P``), or the one its path starts with when states are saved by
  collection (``{'params': nnx.state(model, nnx.Param), ...}``). A variable
  read into two collections is an error; one that no target key reads keeps
  its stored key and is not copied (logged). What holds the model part
  (``model/`` in a dict or an ``nnx.ModelAndOptimizer``) is the prefix under
  which the target reads the most variables.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from absl import logging
import jax
import numpy as np

from hooks.readers import check_keys
from hooks.readers import DonorError
from hooks.readers import DonorReader

__all__ = ['FORM', 'NnxStateView', 'is_nnx_state', 'view']

FORM = 'orbax-nnx-state'
_VALUE = '/value'
_STEP = 'step'
_OPT_STATE = 'opt_state/'


def is_nnx_state(keys: Iterable[str]) -> bool:
  """Whether stored tensor keys are an ``nnx.State``'s (``.../value``)."""
  keys = list(keys)
  return bool(keys) and all(k.endswith(_VALUE) for k in keys)


def _optimizer_prefix(path: str, names: Sequence[str]) -> str | None:
  """What holds ``nnx.state(optimizer)``: the prefix of ``step``, beside
  ``opt_state/``; None when the donor has no optimizer state."""
  found = sorted({n[:-len(_STEP)] for n in names
                  if n == _STEP or n.endswith('/' + _STEP)})
  found = [p for p in found if any(n.startswith(p + _OPT_STATE) for n in names)]
  if len(found) > 1:
    raise DonorError(
        f'Donor {path!r} ({FORM}) holds {len(found)} optimizer states, under '
        f'{found}; save the one to copy from on its own.')
  return found[0] if found else None


def _prefixes(names: Sequence[str]) -> list[str]:
  """``''`` and each directory every name lies under (``'model/'``, ...)."""
  parts = [n.split('/')[:-1] for n in names]
  common = []
  for level in zip(*parts):
    if len(set(level)) > 1:
      break
    common.append(level[0])
  return ['/'.join(common[:i]) + '/' * (i > 0) for i in range(len(common) + 1)]


def _candidates(name: str, reads: Mapping[str, Sequence[str]]) -> list[str]:
  """The target keys a model variable could go to: ``<c>/name`` for each
  collection the target reads ``name`` into, else ``name`` itself when it
  starts with one (a dict of states by collection, ``{'params': ...}``)."""
  found = sorted({f"{t.partition('/')[0]}/{name}" for t in reads.get(name, ())})
  head, _, rest = name.partition('/')
  if not found and any(t.startswith(head + '/') for t in reads.get(rest, ())):
    found = [name]
  return found


def _model_prefix(path: str, names: Sequence[str],
                  reads: Mapping[str, Sequence[str]]) -> str:
  """The prefix under which the target reads the most model variables, each
  into one collection."""
  score = {p: sum(len(_candidates(n[len(p):], reads)) == 1 for n in names)
           for p in _prefixes(names)}
  best = max(score.values(), default=0)
  tied = [p for p, s in score.items() if s == best]
  if best and len(tied) > 1:
    raise DonorError(
        f'Donor {path!r} ({FORM}): the target reads {best} of its variables '
        f'under each of the prefixes {tied}; cannot tell where the model is. '
        'Save nnx.state(model) on its own, or as {"model": ...}.')
  return tied[0] if best else ''


def _target_key(path: str, name: str, reads: Mapping[str, Sequence[str]]
                ) -> str | None:
  found = _candidates(name, reads)
  if len(found) > 1:
    raise DonorError(
        f'Donor {path!r} ({FORM}) stores no collections, and the target reads '
        f'its variable {name!r} into {found}: one variable cannot be both. '
        'Exclude it (it then goes to neither), or save the donor by '
        "collection: {'params': nnx.state(model, nnx.Param), 'batch_stats': "
        'nnx.state(model, nnx.BatchStat)}.')
  return found[0] if found else None


class NnxStateView:
  """An ``'orbax-nnx-state'`` donor under the target's names (see module).

  ``structure()``, ``read(keys)`` use the new names; reads go to the donor
  reader (only the tensors asked for), whose ``digest`` and ``provenance``
  (its stored keys) these are.

  Args:
    reader: The donor's reader.
    names: New key -> the donor's stored key.
    not_read: Stored keys of model variables no target key reads.
  """

  def __init__(self, reader: DonorReader, names: Mapping[str, str],
               not_read: Sequence[str]) -> None:
    self._reader, self._names = reader, dict(names)
    self.not_read = list(not_read)
    self.path, self.form, self.step = reader.path, reader.form, reader.step
    self.item, self.metadata = reader.item, reader.metadata
    stored = reader.structure()
    self._structure = {k: stored[v] for k, v in self._names.items()}

  def structure(self) -> dict[str, jax.ShapeDtypeStruct]:
    """Returns new key -> shape/dtype of every stored tensor."""
    return dict(self._structure)

  def read(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Reads exactly ``keys`` (new names) from the donor."""
    keys = check_keys(self.path, keys, self._structure)
    values = self._reader.read([self._names[k] for k in keys])
    return {k: values[self._names[k]] for k in keys}

  def read_slices(self, key: str, indices: Sequence[Any]) -> list[np.ndarray]:
    """Reads the parts ``indices`` of ``key`` (a new name) from the donor."""
    key, = check_keys(self.path, [key], self._structure)
    return self._reader.read_slices(self._names[key], indices)

  def chunked(self, key: str) -> bool:
    """Whether the donor stores ``key`` in chunks smaller than the tensor."""
    return self._reader.chunked(self._names[key])

  def digest(self) -> str:
    """Returns the donor reader's digest (stored keys)."""
    return self._reader.digest()

  def provenance(self) -> dict[str, Any]:
    """Returns the donor reader's provenance (stored keys)."""
    return self._reader.provenance()

  def __repr__(self) -> str:
    return f'NnxStateView({self._reader!r})'


def view(reader: DonorReader, reads: Mapping[str, Sequence[str]],
         skip: Collection[str] = ()) -> NnxStateView:
  """Names an ``'orbax-nnx-state'`` donor's tensors for the target.

  Args:
    reader: The donor's reader (``reader.form == FORM``).
    reads: Donor path (no collection, no ``/value``) -> the target keys
      that read it (``<collection>/<path>``), e.g. ``{'Conv_0/kernel':
      ['params/Conv_0/kernel']}``.
    skip: Model paths the view leaves out (the target's RNG state, which
      the flat view does not hold).

  Returns:
    The view: ``params/...``, ``batch_stats/...``, ``opt_state/...``,
    ``step``; model variables no target key reads keep their stored key.

  Raises:
    DonorError: If the target reads one variable into two collections, or
      the donor holds two optimizer states or an ambiguous model prefix.
  """
  stored = list(reader.structure())
  short = {k[:-len(_VALUE)]: k for k in stored}
  opt = _optimizer_prefix(reader.path, list(short))
  names: dict[str, str] = {}
  model = []
  for name, key in short.items():
    if opt is not None and (name == opt + _STEP or
                            name.startswith(opt + _OPT_STATE)):
      names[name[len(opt):]] = key
    else:
      model.append(name)
  prefix = _model_prefix(reader.path, model, reads)
  not_read = []
  for name in model:
    # Every model name lies under the prefix.
    if name[len(prefix):] in skip:
      continue
    key = _target_key(reader.path, name[len(prefix):], reads)
    if key is None:
      not_read.append(short[name])
      key = short[name]
    if key in names:
      raise DonorError(f'Donor {reader.path!r} ({FORM}): both {names[key]!r} '
                       f'and {short[name]!r} go to the target key {key!r}.')
    names[key] = short[name]
  logging.debug('Donor %s (%s): %d tensors under the target\'s names; %d model '
               'variables no target key reads, not copied: %s', reader.path,
               FORM, len(names) - len(not_read), len(not_read), not_read)
  return NnxStateView(reader, names, not_read)
