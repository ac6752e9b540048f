"""One test over every registered hook: the hook contract.

Every registered hook runs over three model families (the seed CNN, a
BatchNorm net with a ``head``, a small Transformer), each written in Linen
(a ``TrainState``) and in NNX (``(model, nnx.Optimizer)`` under the same
flat names, ``tests.hooks.nnx_families``), with Adam (``hooks.optim``,
a count per tensor) and SGD-momentum states, concretely, as a dry run and
over an abstract state (``nnx.eval_shape`` for NNX). Each family has an
example per hook in ``examples``, shared by both APIs (the coverage test
fails for a hook without one). Hooks that edit a live state go through
``hooks.apply`` (a donor, when they need one, is an orbax
``StandardCheckpointer`` directory: a Linen ``TrainState``, or the nested
flat view of an NNX state, see ``DONOR_API``); hooks that read another
layout (a legacy ``flax.optim`` checkpoint, renamed layers, a head or
vocabulary with other labels) go through ``hooks.restore`` from an in-memory
``hooks.DonorReader`` that records its reads.

Every value the report says was acted on is checked against where the
report says it came from (the donor, the input, the fresh state, or by
label), and every other value is the input's own.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

import hooks
from hooks import flat as flat_lib
from hooks import nnx_state
from hooks import validation
from hooks import views
from tests.hooks import families
from tests.hooks import helpers
from tests.hooks import nnx_families

DONOR = '<donor checkpoint>'  # Replaced by the family's donor path.
FAMILIES = {f.id: f for f in (families.CNN, families.BN, families.TRANSFORMER,
                              *nnx_families.FAMILIES.values())}
# The API that wrote the donor of each NNX family: NNX donors are saved as
# their flat view nested by '/', Linen donors as the TrainState.
DONOR_API = {'cnn': 'nnx', 'bn': 'linen', 'transformer': 'nnx'}
MODES = ('concrete', 'dry_run', 'abstract')
TOKENS = [f'tok{i}' for i in range(50)]  # The Transformer's vocabulary.


@dataclasses.dataclass(frozen=True)
class Labels:
  """A labelled axis an example moves (what the checks expect).

  Attributes:
    layers: Regex over layer paths.
    axis: The labelled axis.
    source: Labels of the source entries.
    target: Labels of the target entries.
    label_map: Target label -> source label (else equal labels pair).
    unpaired: Where target entries without a source come from: ``'fresh'``
      (map_labels, resize_head) or ``'input'`` (copies keep the value).
  """

  layers: str
  axis: int
  source: Sequence[Any]
  target: Sequence[Any]
  label_map: Mapping[Any, Any] | None = None
  unpaired: str = 'fresh'

  def pairs(self) -> list[int | None]:
    """The source index of each target entry, or None."""
    index = {label: i for i, label in enumerate(self.source)}
    out = []
    for label in self.target:
      if self.label_map is not None:
        label = self.label_map.get(label, object())
      out.append(index.get(label))
    return out


@dataclasses.dataclass(frozen=True)
class Example:
  """Parameters that make a hook act on one family.

  Attributes:
    params: The entry's parameters (``DONOR`` stands for the donor path).
    checkpoint: For ``hooks.restore``: turns the flat state into the
      checkpoint's layout; None: the hook runs through ``hooks.apply``.
    labels: The labelled axes the hook moves.
  """

  params: Mapping[str, Any]
  checkpoint: Callable[[dict[str, Any]], dict[str, Any]] | None = None
  labels: Sequence[Labels] = ()


def _layer_keys(flat: Mapping[str, Any], layer: str) -> list[str]:
  """Keys of ``layer`` in every collection and optimizer slot."""
  pattern = re.compile(rf'(?:.*/)?{re.escape(layer)}/[^/]+')
  return [k for k in flat if k != 'step' and pattern.fullmatch(k)
          and np.ndim(flat[k]) > 0]


def _take(flat: dict[str, Any], layer: str, axis: int,
          index: Sequence[int]) -> dict[str, Any]:
  """The checkpoint of a run whose ``layer`` had entries ``index`` only.

  A count of one value along ``axis`` (``hooks.counts``) stays as it is.
  """
  out = dict(flat)
  for key in _layer_keys(flat, layer):
    if '/count/' in key and np.shape(flat[key])[axis] == 1:
      continue
    out[key] = np.take(np.asarray(flat[key]), np.asarray(index), axis=axis)
  return out


def _rename_layer(flat: dict[str, Any], old: str, new: str
                  ) -> dict[str, Any]:
  """The checkpoint of a run where layer ``old`` was called ``new``."""
  return {'/'.join(new if p == old else p for p in k.split('/')): v
          for k, v in flat.items()}


def _legacy(flat: dict[str, Any]) -> dict[str, Any]:
  """The layout flax.optim wrote: target/, state/step, state/param_states/."""
  names = {'mu': 'grad_ema', 'nu': 'grad_sq_ema', 'trace': 'momentum'}
  legacy = {'state/step': np.asarray(flat['step'])}
  for key, slots in flat_lib.slot_index(flat).items():
    path = key[len('params/'):]
    legacy['target/' + path] = flat[key]
    for slot in slots:
      name = flat_lib.split_slot(slot, key).rsplit('/', 1)[-1]
      if name in names:
        legacy[f'state/param_states/{path}/{names[name]}'] = flat[slot]
  return legacy


def _cnn() -> dict[str, Example]:
  head = 'Dense_1'
  return {
      'copy_params': Example({'donor': DONOR, 'exclude': [f'{head}/.*']}),
      'copy_slots': Example({'donor': DONOR, 'include': ['Conv_.*']}),
      'copy_step': Example({'donor': DONOR}),
      'map_labels': Example(
          {'layers': head, 'from_labels': ['b', 'c', 'd', 'e'],
           'to_labels': ['a', 'b', 'c', 'd', 'e']},
          functools.partial(_take, layer=head, axis=-1, index=[1, 2, 3, 4]),
          [Labels(head, -1, 'bcde', 'abcde')]),
      'migrate_flax_optim': Example({}, _legacy),
      'reinit': Example({'patterns': [f'{head}/.*']}),
      'rename': Example(
          {'rules': [('classifier/(.*)', rf'{head}/\1')]},
          functools.partial(_rename_layer, old=head, new='classifier')),
      'reset_slots': Example({'patterns': ['Conv_0/.*', f'{head}/bias']}),
      'resize_head': Example(
          {'layer': head, 'from_classes': [3, 0, 1, 2],
           'to_classes': [0, 1, 2, 3, 4]},
          functools.partial(_take, layer=head, axis=-1, index=[3, 0, 1, 2]),
          [Labels(head, -1, [3, 0, 1, 2], [0, 1, 2, 3, 4])]),
      'warm_start': Example(
          {'donor': DONOR, 'exclude': ['Conv_1/.*'],
           'labels': [{'layers': head, 'donor': [0, 1, 2, 3, 4],
                       'target': [4, 3, 2, 1, 0]}],
           'opt_state': 'donor', 'step': 'donor'},
          labels=[Labels(head, -1, [0, 1, 2, 3, 4], [4, 3, 2, 1, 0],
                         unpaired='input')]),
  }


def _bn() -> dict[str, Example]:
  head, source, target = 'head', [10, 11, 12, 13], [20, 21, 22, 23, 24]
  label_map = {20: 13, 22: 10, 24: 11}
  return {
      'copy_params': Example(
          {'donor': DONOR, 'include': ['Conv_0/.*', 'BatchNorm_0/.*']}),
      'copy_slots': Example({'donor': DONOR}),
      'copy_step': Example({'donor': DONOR}),
      'map_labels': Example(
          {'layers': head, 'from_labels': source, 'to_labels': target,
           'label_map': label_map},
          functools.partial(_take, layer=head, axis=-1, index=[0, 1, 2, 3]),
          [Labels(head, -1, source, target, label_map)]),
      'migrate_flax_optim': Example({}, _legacy),
      'reinit': Example({'patterns': ['BatchNorm_0/.*', f'{head}/.*']}),
      'rename': Example(  # batch_stats/BatchNorm_0 moves with its params.
          {'rules': [('norm/(.*)', r'BatchNorm_0/\1')]},
          functools.partial(_rename_layer, old='BatchNorm_0', new='norm')),
      'reset_slots': Example({'patterns': ['BatchNorm_0/.*']}),
      'resize_head': Example(
          {'layer': head, 'from_classes': ['d', 'a', 'b', 'c'],
           'to_classes': ['a', 'b', 'c', 'd', 'e']},
          functools.partial(_take, layer=head, axis=-1, index=[3, 0, 1, 2]),
          [Labels(head, -1, 'dabc', 'abcde')]),
      'warm_start': Example(
          {'donor': DONOR,
           'labels': [{'layers': head, 'donor': list('abcde'),
                       'target': list('excba')}],
           'opt_state': 'donor'},
          labels=[Labels(head, -1, 'abcde', 'excba', unpaired='input')]),
  }


def _transformer() -> dict[str, Example]:
  head, embed = 'head', 'Embed_0'
  old = TOKENS[:48][::-1]  # A 48-token vocabulary, in another order.
  shuffled = [TOKENS[i] for i in np.random.default_rng(0).permutation(50)]
  donor_vocab = shuffled[:45] + ['old0', 'old1', 'old2', 'old3', 'old4']
  return {
      'copy_params': Example(
          {'donor': DONOR,
           'include': [f'{embed}/.*', 'MultiHeadDotProductAttention_0/.*']}),
      'copy_slots': Example({'donor': DONOR, 'exclude': [f'{head}/.*']}),
      'copy_step': Example({'donor': DONOR}),
      'map_labels': Example(
          {'layers': embed, 'axis': 0, 'from_labels': old,
           'to_labels': TOKENS},
          functools.partial(_take, layer=embed, axis=0,
                            index=list(range(47, -1, -1))),
          [Labels(embed, 0, old, TOKENS)]),
      'migrate_flax_optim': Example({}, _legacy),
      'reinit': Example({'patterns': [f'{head}/.*', 'LayerNorm_1/.*']}),
      'rename': Example(
          {'rules': [('attention/(.*)', r'MultiHeadDotProductAttention_0/\1')]},
          functools.partial(_rename_layer, old='MultiHeadDotProductAttention_0',
                            new='attention')),
      'reset_slots': Example(
          {'patterns': [f'{embed}/.*',
                        'MultiHeadDotProductAttention_0/out/.*']}),
      'resize_head': Example(
          {'layer': head, 'from_classes': [3, 0, 1, 2],
           'to_classes': [0, 1, 2, 3, 4]},
          functools.partial(_take, layer=head, axis=-1, index=[3, 0, 1, 2]),
          [Labels(head, -1, [3, 0, 1, 2], [0, 1, 2, 3, 4])]),
      'warm_start': Example(
          {'donor': DONOR, 'exclude': ['LayerNorm_.*'],
           'labels': [{'layers': embed, 'axis': 0, 'donor': donor_vocab,
                       'target': TOKENS}],
           'opt_state': 'donor', 'step': 'donor'},
          labels=[Labels(embed, 0, donor_vocab, TOKENS, unpaired='input')]),
  }


EXAMPLES = {'cnn': _cnn(), 'bn': _bn(), 'transformer': _transformer()}


class SpySources(hooks.Sources):
  """``hooks.Sources`` that records every ``read`` of the readers it opens."""

  def __init__(self) -> None:
    super().__init__()
    self.reads: list[list[str]] = []

  def open(self, path, **kwargs):  # pylint: disable=arguments-differ
    reader = super().open(path, **kwargs)
    reads = self.reads

    class Spy:
      def __getattr__(self, name):
        return getattr(reader, name)

      def read(self, keys):
        reads.append(list(keys))
        return reader.read(keys)

    return Spy()


@functools.lru_cache(maxsize=None)
def _states(family: str, opt: str) -> tuple[Any, Any, Any]:
  """(the state surgery starts from, a fresh state, the donor state).

  NNX states are edited in place: runs take ``families.copy`` of them.
  """
  fam = FAMILIES[family]
  donor = fam
  if fam.api == 'nnx' and DONOR_API[fam.name] == 'linen':
    donor = families.FAMILIES[fam.name]
  return (fam.used(opt, seed=0, step=3), fam.state(opt, seed=1),
          donor.used(opt, seed=2, step=7))


@functools.lru_cache(maxsize=None)
def _flats(family: str, opt: str) -> tuple[dict[str, Any], ...]:
  """The flat views of ``_states(family, opt)`` (read only)."""
  return tuple(views.flatten(s) for s in _states(family, opt))


@functools.lru_cache(maxsize=None)
def _abstract(family: str, opt: str) -> Any:
  """The abstract state (the contract checks that runs leave it alone)."""
  return FAMILIES[family].abstract(opt)


def _saveable(state: Any) -> Any:
  """What a user hands orbax: a TrainState, or an NNX state's nested view."""
  if nnx_state.is_nnx(state):
    return traverse_util.unflatten_dict(nnx_state.flatten(state), sep='/')
  return state


def _kind(state: Any) -> Any:
  """The state's type (of the model and optimizer, for NNX)."""
  if nnx_state.is_nnx(state):
    return tuple(type(part) for part in state)
  return type(state)


@pytest.fixture(scope='module')
def donors(tmp_path_factory):
  """Family, optimizer -> the donor state saved by StandardCheckpointer."""
  paths: dict[tuple[str, str], str] = {}

  def get(family: str, opt: str) -> str:
    if (family, opt) not in paths:
      path = tmp_path_factory.mktemp(f'{family}_{opt}') / 'donor'
      checkpointer = ocp.StandardCheckpointer()
      checkpointer.save(path, _saveable(_states(family, opt)[2]))
      checkpointer.wait_until_finished()
      paths[family, opt] = str(path)
    return paths[family, opt]

  return get


def test_every_registered_hook_has_an_example_per_family():
  for family, examples in EXAMPLES.items():
    missing = sorted(set(hooks.names()) - set(examples))
    assert not missing, f'Add examples for {missing} to {family!r}.'


def test_memory_reader_is_a_donor_reader():
  assert isinstance(helpers.MemoryReader({}), hooks.DonorReader)


def _owner(key: str, params: set[str]) -> str | None:
  """The param path an ``opt_state/`` key ends with (the longest)."""
  parts = key.split('/')
  for start in range(1, len(parts)):
    if '/'.join(parts[start:]) in params:
      return '/'.join(parts[start:])
  return None


def _layer(key: str, params: set[str]) -> str:
  if key.startswith('opt_state/'):
    path = _owner(key, params) or key
  else:
    path = key.partition('/')[2]
  return path.rpartition('/')[0]


def _full(flat: Mapping[str, Any], key: str) -> np.ndarray:
  """``flat[key]``; a count (``hooks.counts``) broadcast to its param's shape,
  so that entries compare one by one."""
  value = np.asarray(flat[key])
  params = {k.split('/', 1)[1] for k in flat if k.startswith('params/')}
  owner = _owner(key, params) if '/count/' in key else None
  if owner is None:
    return value
  return np.broadcast_to(value, np.shape(flat[f'params/{owner}']))


def _check_labelled(key: str, out: np.ndarray, source: np.ndarray,
                    unpaired: np.ndarray, spec: Labels) -> None:
  for j, i in enumerate(spec.pairs()):
    want = (np.take(unpaired, j, axis=spec.axis) if i is None
            else np.take(source, i, axis=spec.axis))
    np.testing.assert_array_equal(
        np.take(out, j, axis=spec.axis), want,
        err_msg=f'{key}: entry {j} ({spec.target[j]!r}) from '
        + ('nowhere' if i is None else f'source entry {i}'))


def _check_values(out: Mapping[str, Any], inp: Mapping[str, Any],
                  donor: Mapping[str, Any], fresh: Mapping[str, Any],
                  report: hooks.Report, example: Example, same_objects: bool
                  ) -> None:
  """Checks every leaf against where the report says it came from."""
  params = {k.split('/', 1)[1] for k in out if k.startswith('params/')}
  for key, leaf in out.items():
    value = np.asarray(leaf)
    full = _full(out, key)
    actions = {a.action: a for a in report.actions(key)}
    actions.pop('unchanged', None)
    spec = next((s for s in example.labels
                 if re.fullmatch(s.layers, _layer(key, params))), None)
    if 'copied' in actions:
      source = np.asarray(donor[actions['copied'].source])
      if spec is None:
        np.testing.assert_array_equal(value, source, err_msg=key)
      else:
        _check_labelled(key, full, _full(donor, actions['copied'].source),
                        _full(inp, key), spec)
    elif 'renamed' in actions:
      np.testing.assert_array_equal(
          value, np.asarray(inp[actions['renamed'].source]), err_msg=key)
    elif 'migrated' in actions:
      source = np.asarray(inp[actions['migrated'].source])
      np.testing.assert_array_equal(
          value, np.broadcast_to(source, value.shape).astype(value.dtype),
          err_msg=key)
    elif actions.keys() & {'relabelled', 'resized'}:
      assert spec is not None, f'{key} was relabelled, not by the example.'
      _check_labelled(key, full, _full(inp, key), _full(fresh, key), spec)
    elif actions.keys() & {'reinitialized', 'reset'}:
      np.testing.assert_array_equal(value, np.asarray(fresh[key]),
                                    err_msg=key)
    else:
      assert not actions, f'{key}: no check for {sorted(actions)}.'
      if same_objects:
        assert leaf is inp[key], f'{key!r} changed without being reported.'
      np.testing.assert_array_equal(value, np.asarray(inp[key]), err_msg=key)


def _check_slots(out: Mapping[str, Any], expected: Mapping[str, Any]
                 ) -> None:
  """Every slot is shaped like its param (a count fits it: every axis 1 or
  the param's), and every param has its slots."""
  params = {k.split('/', 1)[1]: k for k in out if k.startswith('params/')}
  for key, leaf in out.items():
    owner = _owner(key, set(params)) if key.startswith('opt_state/') else None
    if owner is not None and np.ndim(leaf) > 0:
      shape = np.shape(out[params[owner]])
      if '/count/' in key:
        assert len(np.shape(leaf)) == len(shape), key
        assert all(c in (1, p) for c, p in zip(np.shape(leaf), shape)), key
      else:
        assert np.shape(leaf) == shape, key
  have = {k: len(v) for k, v in flat_lib.slot_index(out).items()}
  want = {k: len(v) for k, v in flat_lib.slot_index(expected).items()}
  assert have == want


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('name', hooks.names())
@pytest.mark.parametrize('opt', families.OPTIMIZERS)
@pytest.mark.parametrize('family', list(FAMILIES))
def test_hook_contract(family, opt, name, mode, donors):
  fam = FAMILIES[family]
  example = EXAMPLES[fam.name][name]
  used, fresh_state, _ = _states(family, opt)
  used_flat, fresh, donor = _flats(family, opt)
  restoring = example.checkpoint is not None
  sources = SpySources()
  params = {k: donors(family, opt) if v == DONOR else v
            for k, v in example.params.items()}
  inputs = []

  def hook(flat, ctx):  # The registered hook, watched.
    before = dict(flat)
    out = hooks.build({'name': name, **params})(flat, ctx)
    assert out is not flat, 'A hook returns a new dict.'
    assert flat.keys() == before.keys()
    assert all(flat[k] is before[k] for k in flat), 'The hook edited its input.'
    inputs.append(flat)
    return out

  flat_like = views.flatten
  if mode == 'abstract':
    start = _abstract(family, opt)
  else:
    start = families.copy(fresh_state if restoring else used)
  expected = validation.expected_structure(fresh)
  before = flat_like(start)
  if restoring:
    reader = helpers.MemoryReader(example.checkpoint(used_flat))
    state, report = hooks.restore(
        reader, start, [hook], rng=jax.random.key(0),
        fresh=lambda: fresh_state, sources=sources, dry_run=mode != 'concrete')
    inp = reader.pristine
  else:
    state, report = hooks.apply(
        start, [hook], rng=jax.random.key(0), fresh=lambda: fresh_state,
        sources=sources, dry_run=mode == 'dry_run')
    inp = before
  if fam.api == 'nnx' and mode == 'concrete':  # Updated in place.
    assert all(a is b for a, b in zip(state, start))
  else:  # The start state is left alone.
    after = flat_like(start)
    assert all(after[k] is before[k] for k in before)
    if fam.api == 'nnx':
      assert not any(a is b for a, b in zip(state, start))

  assert _kind(state) == _kind(fresh_state)
  out = flat_like(state)
  validation.check_structure(out, expected)
  abstract = mode != 'concrete'
  assert all(isinstance(v, jax.ShapeDtypeStruct) == abstract
             for v in out.values())
  _check_slots(out, expected)

  # Every param and slot is reported; the example acts.
  for key in [k for k in out if k.startswith('params/')]:
    assert report.actions(key), f'{key} is not in the report.'
  for slots in flat_lib.slot_index(out).values():
    assert all(report.actions(k) for k in slots)
  acted = [k for k in report.keys()
           if {a.action for a in report.actions(k)} != {'unchanged'}]
  assert acted, f'The example for {name!r} does nothing; make it act.'
  assert set(acted) <= out.keys()

  # Donors and checkpoints are read only for real runs.
  if abstract:
    assert sources.reads == []
    if restoring:
      assert reader.reads == []
    assert all(not s.get('keys_read') for s in report.sources)
  elif DONOR in example.params.values():  # Opened once, and named.
    assert sources.reads and len(report.sources) == 1
    source = report.sources[0]
    assert source['path'] == params['donor'] and source['keys_read']
    assert len(source['sha256']) == 64
  if abstract:
    for key in set(out) - set(acted):
      assert validation.shape_dtype(out[key]) == validation.shape_dtype(
          inputs[0][key])
      if not restoring:  # restore gives every leaf the target's sharding.
        assert out[key] is inputs[0][key], f'{name!r} changed {key!r}.'
    return

  _check_values(out, inp, donor, fresh, report, example,
                same_objects=not restoring)
  if restoring:
    reader.check_unwritten()
