"""Tests for labelled axes: label specs, pairing, descriptions, map_labels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.training import train_state

import hooks
from hooks import flat as flat_lib
from hooks import labels
from hooks import optim
from hooks import pairing
from tests.hooks import checkpoints

RNG = jax.random.key(0)
OLD = ['a', 'b', 'c', 'd', 'e', 'f']
NEW = ['x', 'c', 'a', 'y', 'f']


def _np(x):
  return np.asarray(x)


def test_parse_accepts_aliases_and_json_digit_strings():
  (spec,) = labels.parse([{'layers': 'head', 'from': [0, 1, 2], 'to': [2, 0, 5],
                           'map': {'5': '1', '0': 0}}], hook='h')
  assert spec == labels.LabelSpec('head', -1, (0, 1, 2), (2, 0, 5),
                                  ((5, 1), (0, 0)))
  (spec,) = labels.parse([{'layers': 'Embed_0', 'axis': 0, 'donor': ['7', 'a'],
                           'target': ['a', '7'], 'map': {'7': '7'}}], hook='h')
  assert spec.label_map == (('7', '7'),)  # String labels stay strings.


@pytest.mark.parametrize('specs, message', [
    ([{'donor': [0], 'target': [0]}],
     "h: class_map/map without a named layer (layers=None): name the labelled "
     "layer(s), e.g. {'layers': 'head', ...}."),
    ({'layers': 'head'}, 'h: labels must be a list of specs'),
    ([{'layers': 'head', 'classes': [0]}],
     "h: label spec {'layers': 'head', 'classes': [0]} has unknown key(s) "
     "['classes']; it accepts ['axis', 'donor', 'from', 'layers', 'map', "
     "'target', 'to']."),
    ([{'layers': 'head', 'donor': [0], 'from': [1]}], 'gives source twice'),
    ([{'layers': 'head', 'target': [3, 1, 3, 'x', 'x']}],
     "h: target labels [3, 1, 3, 'x', 'x'] repeats label(s) [3, 'x']"),
    ([{'layers': 'head', 'target': [True]}],
     'h: target labels holds True; labels are ints or strings'),
    ([{'layers': 'head', 'target': 'abc'}], "target labels 'abc' must be a list"),
    ([{'layers': 'head', 'axis': '0'}], "h: axis '0' must be an int"),
    ([{'layers': '(head'}], "h: layers '(head' is not a valid regex"),
    ([{'layers': 'head', 'map': [1, 2]}], 'h: map [1, 2] must be a dict'),
])
def test_parse_errors(specs, message):
  with pytest.raises(ValueError) as e:
    labels.parse(specs, hook='h')
  assert message in str(e.value)


def test_spec_for_matches_the_layer_path_fully_first_spec_wins():
  specs = labels.parse([{'layers': 'encoder/.*', 'axis': 0},
                        {'layers': 'encoder/head'}], hook='h')
  assert labels.layer_of('encoder/head/kernel') == 'encoder/head'
  assert labels.spec_for(specs, 'encoder/head/kernel') is specs[0]
  assert labels.spec_for(specs, 'head/kernel') is None
  assert labels.spec_for(specs, 'encoder/kernel') is None  # Layer 'encoder'.


def test_pairs_by_label_and_by_map():
  assert pairing.pairs([9, 8, 7, 6], [6, 7, 0]) == ((2, 3), (1, 0))
  assert pairing.pairs(['x', 'c', 'a'], ['a', 'b', 'c']) == ((1, 2), (2, 0))
  assert pairing.pairs([0, 1, 2], [5, 6], [(2, 5), (0, 5)]) == ((0, 2), (0, 0))


def test_resolve_checks_sizes_and_map_labels():
  spec = labels.spec('head', -1, list(range(12)), None, {11: 0, 3: 30})
  with pytest.raises(ValueError) as e:
    pairing.resolve(spec, 4, 12, key='params/head/bias')
  assert str(e.value) == (
      'map {11: 0, 3: 30} for params/head/bias: target label(s) [11] not in '
      'the labels [0, 1, 2, 3]; donor label(s) [30] not in the 12 labels '
      '[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, ...].')
  with pytest.raises(ValueError, match=(
      r"^12 donor labels but the donor d/kernel has 3 entries on axis -1 "
      r"\(layers='head'\); give one label per entry.$")):
    pairing.resolve(spec, 4, 3, key='t/kernel', source_key='d/kernel')


@pytest.mark.parametrize('rank, axis, names', [
    (2, -1, ('columns', 'column')), (2, 0, ('rows', 'row')),
    (1, 0, ('entries', 'entry')), (3, 1, ('axis-1 entries', 'axis-1 entry')),
])
def test_describe_names_columns_rows_and_entries(rank, axis, names):
  p = pairing.resolve(labels.spec('l', axis, [0, 1, 2, 3], [2, 3, 4]), 3, 4,
                      key='k')
  assert pairing.describe(p, rank, axis) == (
      f'{names[0]} by label: 0..1 (2..3) <- donor {names[0]} 2..3; new: 2 (4) '
      f'(fresh); dropped: donor {names[0]} 0..1')
  p = pairing.resolve(labels.spec('l', axis, [0, 1], [1]), 1, 2, key='k')
  assert pairing.describe(p, rank, axis, source='incoming') == (
      f'{names[0]} by label: 0 (1) <- incoming {names[1]} 1; dropped: '
      f'incoming {names[1]} 0')


def test_describe_shortens_long_runs():
  p = pairing.resolve(labels.spec('l', 0), 20, 20, key='k')
  assert pairing.describe(p, 2, 0) == 'rows by label: 0..19 <- donor rows 0..19'
  odd = pairing.Pairing(tuple(range(0, 20, 2)), tuple(range(0, 20, 2)),
                        tuple(range(20)), tuple(range(20)))
  assert pairing.describe(odd, 1, 0).startswith(
      'entries by label: 0 <- donor entry 0, 2 <- donor entry 2, 4 <- donor '
      'entry 4, 6 <- donor entry 6, 8 <- donor entry 8, 10 <- donor entry 10, '
      '... (10 runs); new: 1, 3, 5, 7, 9, 11, ... (10 runs) (fresh)')


def test_check_layers_lists_the_layers_and_close_ones():
  specs = labels.parse([{'layers': 'Dense_2'}, {'layers': 'Dense_.*'}],
                       hook='h')
  labels.check_layers(specs[1:], ['Dense_0/kernel'], hook='h')
  with pytest.raises(ValueError) as e:
    labels.check_layers(specs, ['Dense_0/kernel', 'Dense_1/bias', 'x'],
                        hook='h')
  assert str(e.value) == (
      "h: 1 label spec(s) match none of the layers:\n  layers='Dense_2' (did "
      "you mean 'Dense_1' or 'Dense_0'?)\n  The layers are ['', 'Dense_0', "
      "'Dense_1']; layers match a layer path (the key path inside its "
      'collection minus its last part) with re.fullmatch.')


# map_labels on a tiny token model: an embedding table (rows are tokens) and
# an output head (columns are tokens), as plain params.
def _token_state(vocab, seed):
  k0, k1 = jax.random.split(jax.random.key(seed))
  params = {'Embed_0': {'embedding': jax.random.normal(k0, (len(vocab), 3))},
            'head': {'kernel': jax.random.normal(k1, (3, len(vocab))),
                     'bias': jnp.zeros((len(vocab),))}}
  return train_state.TrainState.create(apply_fn=None, params=params,
                                       tx=optim.adam(1e-2))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A six-token state after one step (slots and counts non-zero)."""
  state = _token_state(OLD, 1)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), state.params)
  state = state.apply_gradients(grads=grads)
  return state, checkpoints.save_orbax(str(tmp_path_factory.mktemp('t')), state)


def test_map_labels_remaps_vocabulary_rows_and_columns_with_their_slots(
    trained):
  state, path = trained
  target = _token_state(NEW, 2)
  entries = [
      {'name': 'map_labels', 'layers': 'Embed_0', 'axis': 0,
       'from_labels': OLD, 'to_labels': NEW},
      {'name': 'map_labels', 'layers': 'head', 'from_labels': OLD,
       'to_labels': NEW, 'init': 'zeros'},
  ]
  out, report = hooks.restore(path, target, entries, rng=RNG,
                              fresh=lambda: target)
  old, new, fresh = (flat_lib.flatten(s) for s in (state, out, target))
  kept, src = [1, 2, 4], [2, 0, 5]  # c, a, f.
  slots = [k for k in old if '/count/' not in k]
  for key in [k for k in slots if k.endswith('Embed_0/embedding')]:
    assert _np(new[key])[kept].tobytes() == _np(old[key])[src].tobytes(), key
    np.testing.assert_array_equal(_np(new[key])[[0, 3]],
                                  _np(fresh[key])[[0, 3]])
  for key in [k for k in slots if k.endswith('head/kernel')]:
    assert _np(new[key])[:, kept].tobytes() == _np(old[key])[:, src].tobytes()
    np.testing.assert_array_equal(_np(new[key])[:, [0, 3]], 0)
  # Counts grow along the relabelled axis only: kept entries keep theirs.
  steps = int(_np(old['opt_state/0/count/Embed_0/embedding']).ravel()[0])
  assert steps > 0
  np.testing.assert_array_equal(_np(new['opt_state/0/count/Embed_0/embedding']),
                                [[0], [steps], [steps], [0], [steps]])
  np.testing.assert_array_equal(_np(new['opt_state/0/count/head/kernel']),
                                [[0, steps, steps, 0, steps]])
  mu = 'opt_state/0/mu/Embed_0/embedding'
  assert np.abs(_np(old[mu])).sum() > 0
  np.testing.assert_array_equal(_np(new[mu])[[0, 3]], 0)  # Fresh slots.
  assert report.actions('params/Embed_0/embedding')[0].describe() == (
      "resized (6, 3) -> (5, 3) (rows by label: 1 ('c') <- incoming row 2, "
      "2 ('a') <- incoming row 0, 4 ('f') <- incoming row 5; new: 0 ('x'), "
      "3 ('y') (init); dropped: incoming rows 1, 3..4)")


def test_map_labels_permutes_in_place_and_reports_relabelled(trained):
  state, _ = trained
  out, report = hooks.apply(state, [{
      'name': 'map_labels', 'layers': 'head', 'from_labels': OLD,
      'to_labels': OLD[::-1]}], rng=RNG)
  old, new = flat_lib.flatten(state), flat_lib.flatten(out)
  for key in ('params/head/kernel', 'opt_state/0/nu/head/kernel'):
    np.testing.assert_array_equal(_np(new[key]), _np(old[key])[:, ::-1])
    assert report.actions(key)[0].action == 'relabelled'
  count = 'opt_state/0/count/head/kernel'  # Every column kept: one count.
  assert np.shape(new[count]) == (1, 1) and _np(new[count]) == _np(old[count])
  assert new['params/Embed_0/embedding'] is old['params/Embed_0/embedding']


def test_map_labels_errors():
  with pytest.raises(ValueError, match=(
      r"map_labels: from_labels \['a', 'a'\] repeats label\(s\) \['a'\]")):
    hooks.build({'name': 'map_labels', 'layers': 'head',
                 'from_labels': ['a', 'a'], 'to_labels': ['a']})
  with pytest.raises(ValueError, match="map_labels: init='fresh' is not one"):
    hooks.build({'name': 'map_labels', 'layers': 'head', 'from_labels': None,
                 'to_labels': None, 'init': 'fresh'})
  state = _token_state(OLD, 1)
  with pytest.raises(hooks.HookError) as e:
    hooks.apply(state, [{'name': 'map_labels', 'layers': 'Embed', 'axis': 0,
                         'from_labels': OLD, 'to_labels': OLD}], rng=RNG)
  assert ("map_labels: 1 label spec(s) match none of the layers:\n  "
          "layers='Embed' (did you mean 'Embed_0'?)") in str(e.value)

