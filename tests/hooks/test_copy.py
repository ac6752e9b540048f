"""Tests for the copy pieces: copy_params, copy_slots, copy_step."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

import hooks
from hooks import flat as flat_lib
from hooks import optim
from tests.hooks import checkpoints
from tests.hooks import helpers

TEN = list(range(10))
HIGH = [5, 6, 7, 8, 9]
HEAD = [{'layers': 'Dense_1', 'donor': HIGH, 'target': TEN}]
SLOT = 'opt_state/inner_state/0/{}/{}'
RNG = jax.random.key(0)


_tx = helpers.inject_adam


def _np(x):
  return np.asarray(x)


@pytest.fixture(scope='module')
def donor_state():
  """Five classes, one step taken: slots non-zero, counts 1."""
  state = helpers.make_stats_state(_tx(), seed=3)
  return helpers.jitted_train_step(state, *helpers.batch())


@pytest.fixture(scope='module')
def donor_flat(donor_state):
  return {k: _np(v) for k, v in flat_lib.flatten(donor_state).items()}


@pytest.fixture(scope='module')
def donor(tmp_path_factory, donor_state):
  return checkpoints.save_orbax(str(tmp_path_factory.mktemp('d')), donor_state)


@pytest.fixture(scope='module')
def target():
  return helpers.make_stats_state(_tx(), seed=1, num_classes=10)


def _apply(state, *entries):
  out, report = hooks.apply(state, list(entries), rng=RNG)
  return flat_lib.flatten(out), report


def _cause(excinfo) -> str:
  return str(excinfo.value.__cause__ or excinfo.value)


def test_copy_params_places_head_columns_by_label_in_every_collection(
    target, donor, donor_flat):
  out, report = _apply(target, {'name': 'copy_params', 'donor': donor,
                                'labels': HEAD})
  before = flat_lib.flatten(target)
  for key in ('params/Dense_1/kernel', 'params/Dense_1/bias',
              'batch_stats/Dense_1/mean'):
    new, old = _np(out[key]), _np(before[key])
    np.testing.assert_array_equal(new[..., 5:], donor_flat[key])
    np.testing.assert_array_equal(new[..., :5], old[..., :5])
  for key in ('params/Conv_0/kernel', 'batch_stats/Conv_0/mean',
              'batch_stats/Conv_0/var', 'params/Dense_0/bias'):
    np.testing.assert_array_equal(_np(out[key]), donor_flat[key])
  assert [a.describe() for a in report.actions('params/Dense_1/kernel')] == [
      'copied from donor key params/Dense_1/kernel (columns by label: 5..9 '
      '<- donor columns 0..4; new: 0..4 (kept))',
      'resized (16, 5) -> (16, 10)']
  assert report.actions('params/Dense_1/bias')[0].detail == (
      'entries by label: 5..9 <- donor entries 0..4; new: 0..4 (kept)')
  for key in before:  # Optimizer state and step stay the target's.
    if key.startswith('opt_state/') or key == 'step':
      assert out[key] is before[key], key


def test_a_pattern_shadowed_by_an_earlier_one_is_not_an_error(target, donor):
  out, report = _apply(target, {
      'name': 'copy_params', 'donor': donor, 'include': ['.*', 'Conv_0/.*'],
      'exclude': ['Dense_.*', 'Dense_1/.*']})
  copied = [k for k in report.keys()
            if report.actions(k)[0].action == 'copied']
  assert copied == ['batch_stats/Conv_0/mean', 'batch_stats/Conv_0/var',
                    'params/Conv_0/bias', 'params/Conv_0/kernel',
                    'params/Conv_1/bias', 'params/Conv_1/kernel']
  assert out['params/Dense_0/bias'] is flat_lib.flatten(target)[
      'params/Dense_0/bias']


def test_copy_slots_moves_slots_like_their_params(target, donor, donor_flat):
  out, report = _apply(target, {'name': 'copy_slots', 'donor': donor,
                                'labels': HEAD, 'include': ['Dense_.*']})
  before = flat_lib.flatten(target)
  for kind in ('mu', 'nu', 'count'):
    key = SLOT.format(kind, 'Dense_1/kernel')
    donor_value = np.broadcast_to(donor_flat[key], (16, 5))  # Count: (1, 1).
    np.testing.assert_array_equal(_np(out[key])[:, 5:],
                                  donor_value[:np.shape(out[key])[0]])
    np.testing.assert_array_equal(_np(out[key])[:, :5], 0)  # Fresh slots.
    assert _np(out[key]).dtype == _np(before[key]).dtype
    key = SLOT.format(kind, 'Dense_0/bias')
    np.testing.assert_array_equal(_np(out[key]), donor_flat[key])
  # Counts grow along the labelled axis only: the donor's 1, the target's 0.
  count = SLOT.format('count', 'Dense_1/kernel')
  np.testing.assert_array_equal(_np(out[count]), [[0] * 5 + [1] * 5])
  assert [a.describe() for a in report.actions(count)][1] == (
      'resized (1, 1) -> (1, 10)')
  assert np.abs(donor_flat[SLOT.format('mu', 'Dense_1/kernel')]).sum() > 0
  assert (donor_flat[SLOT.format('count', 'Dense_1/bias')] == 1).all()
  for key in before:  # Params, other layers' slots and counts untouched.
    if key.startswith(('params/', 'batch_stats/', 'step')) or 'Conv' in key:
      assert out[key] is before[key], key
  assert report.actions(SLOT.format('nu', 'Dense_1/bias'))[0].source == (
      SLOT.format('nu', 'Dense_1/bias'))


def test_copy_step_takes_step_and_scalar_counts_only(target, donor):
  out, report = _apply(target, {'name': 'copy_step', 'donor': donor})
  before = flat_lib.flatten(target)
  for key in ('step', 'opt_state/count',
              'opt_state/hyperparams_states/learning_rate/count'):
    assert int(out[key]) == 1 and int(before[key]) == 0, key
    assert report.actions(key)[0].source == key
  changed = [k for k in before if out[k] is not before[k]]
  assert sorted(changed) == ['opt_state/count',
                             'opt_state/hyperparams_states/learning_rate/count',
                             'step']


def test_pieces_equal_warm_start_bitwise_and_open_the_donor_once(
    target, donor):
  pieces = [{'name': name, 'donor': donor, 'labels': HEAD}
            for name in ('copy_params', 'copy_slots')]
  pieces.append({'name': 'copy_step', 'donor': donor})
  out, report = _apply(target, *pieces)
  whole, whole_report = _apply(target, {
      'name': 'warm_start', 'donor': donor, 'labels': HEAD,
      'opt_state': 'donor', 'step': 'donor'})
  assert out.keys() == whole.keys()
  for key in out:
    a, b = _np(out[key]), _np(whole[key])
    assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), key
  assert len(report.sources) == len(whole_report.sources) == 1
  assert report.sources[0]['sha256'] == whole_report.sources[0]['sha256']


def test_plan_reads_nothing(target, donor):
  report = hooks.plan(target, [{'name': 'copy_params', 'donor': donor,
                                'labels': HEAD},
                               {'name': 'copy_slots', 'donor': donor,
                                'labels': HEAD}], rng=RNG)
  (source,) = report.sources
  assert source['keys_read'] == [] and source['sha256'] is None
  assert report.actions(SLOT.format('nu', 'Dense_1/kernel'))[1].describe() == (
      'resized (16, 5) -> (16, 10)')


def test_reads_only_what_it_copies(target, donor):
  out, report = _apply(target, {'name': 'copy_params', 'donor': donor,
                                'include': ['Conv_0/kernel']})
  assert report.sources[0]['keys_read'] == ['params/Conv_0/kernel']
  assert out['params/Conv_1/kernel'] is flat_lib.flatten(target)[
      'params/Conv_1/kernel']


def test_string_labels_and_a_json_map(target, donor, donor_flat):
  names = ['cat', 'dog', 'eel', 'fox', 'gnu']
  labels = [{'layers': 'Dense_1', 'from': names,
             'to': [f'x{i}' for i in range(8)] + ['gnu', 'cat']}]
  out, _ = _apply(target, {'name': 'copy_params', 'donor': donor,
                           'include': ['Dense_1/.*'], 'labels': labels})
  kernel = donor_flat['params/Dense_1/kernel']
  np.testing.assert_array_equal(_np(out['params/Dense_1/kernel'])[:, 8:],
                                kernel[:, [4, 0]])
  mapped = [{'layers': 'Dense_1', 'map': {'7': 2, '0': 4}}]  # JSON keys.
  out, report = _apply(target, {'name': 'copy_params', 'donor': donor,
                                'include': ['Dense_1/.*'], 'labels': mapped})
  new = _np(out['params/Dense_1/kernel'])
  np.testing.assert_array_equal(new[:, [7, 0]], kernel[:, [2, 4]])
  assert report.actions('params/Dense_1/kernel')[0].detail == (
      'columns by label: 0 <- donor column 4, 7 <- donor column 2; new: '
      '1..6, 8..9 (kept); dropped: donor columns 0..1, 3')


def test_slots_between_frozen_and_unfrozen_states(tmp_path, donor_state,
                                                  donor_flat):
  params = helpers.init_params(1, 10)
  frozen_tx = hooks.freeze(_tx(), params, ['Conv_.*'])
  target = helpers.make_state(frozen_tx, seed=1, num_classes=10)
  path = checkpoints.save_orbax(str(tmp_path / 'plain'), donor_state)
  out, report = _apply(target, {'name': 'copy_slots', 'donor': path,
                                'labels': HEAD, 'exclude': ['Conv_.*']})
  key = ('opt_state/inner_states/trainable/inner_state/inner_state/0/mu/'
         'Dense_1/kernel')
  donor_key = SLOT.format('mu', 'Dense_1/kernel')
  np.testing.assert_array_equal(_np(out[key])[:, 5:], donor_flat[donor_key])
  assert report.actions(key)[0].source == donor_key
  # And back: the frozen state as a donor of an unfrozen target.
  frozen = helpers.jitted_train_step(target, *helpers.batch(num_classes=10))
  path = checkpoints.save_orbax(str(tmp_path / 'frozen'), frozen)
  plain = helpers.make_state(_tx(), seed=2, num_classes=10)
  out, _ = _apply(plain, {'name': 'copy_slots', 'donor': path,
                          'include': ['Dense_1/.*']})
  np.testing.assert_array_equal(
      _np(out[donor_key]), _np(flat_lib.flatten(frozen)[key]))


# A msgpack donor of bare params with other sizes: Dense_0 is (40, 12).
@pytest.fixture(scope='module')
def odd(tmp_path_factory):
  tree = jax.tree.map(np.asarray, helpers.init_params(2))
  tree = {layer: dict(values) for layer, values in tree.items()}
  rng = np.random.default_rng(0)
  tree['Dense_0'] = {'kernel': rng.normal(size=(40, 12)).astype(np.float32),
                     'bias': rng.normal(size=(12,)).astype(np.float32)}
  tree['Conv_1']['kernel'] = tree['Conv_1']['kernel'].astype(np.float16)
  tree['Big'] = tree['Dense_0']
  path = str(tmp_path_factory.mktemp('odd') / 'params.msgpack')
  return checkpoints.save_msgpack(path, tree), tree


@pytest.fixture(scope='module')
def cnn10():
  return helpers.make_state(_tx(), seed=1, num_classes=10)


def test_overlap_skip_and_a_rename_rule_with_its_own_policy(cnn10, odd):
  path, donor = odd
  before = flat_lib.flatten(cnn10)
  out, report = _apply(cnn10, {'name': 'copy_params', 'donor': path,
                               'include': ['Dense_0/.*'],
                               'on_shape_mismatch': 'overlap'})
  kernel = _np(out['params/Dense_0/kernel'])
  np.testing.assert_array_equal(kernel[:, :12], donor['Dense_0']['kernel'][:32])
  np.testing.assert_array_equal(kernel[:, 12:],
                                _np(before['params/Dense_0/kernel'])[:, 12:])
  assert report.actions('params/Dense_0/kernel')[1].describe() == (
      'resized (40, 12) -> (32, 16)')
  out, report = _apply(cnn10, {
      'name': 'copy_params', 'donor': path, 'include': ['Conv_0/.*', 'Dense_0/.*'],
      'rename': [('Dense_0/(.*)', r'Big/\1', 'overlap')],
      'on_shape_mismatch': 'skip'})
  assert report.actions('params/Dense_0/bias')[0].source == 'Big/bias'
  np.testing.assert_array_equal(_np(out['params/Conv_0/kernel']),
                                donor['Conv_0']['kernel'])
  out, report = _apply(cnn10, {'name': 'copy_params', 'donor': path,
                               'include': ['Dense_0/.*'],
                               'on_shape_mismatch': 'skip'})
  assert out['params/Dense_0/kernel'] is before['params/Dense_0/kernel']
  assert report.actions('params/Dense_0/kernel') == [hooks.Action('unchanged')]


def test_dtype_cast(cnn10, odd):
  path, donor = odd
  out, _ = _apply(cnn10, {'name': 'copy_params', 'donor': path,
                          'include': ['Conv_1/kernel'],
                          'on_dtype_mismatch': 'cast'})
  assert out['params/Conv_1/kernel'].dtype == np.float32
  np.testing.assert_array_equal(_np(out['params/Conv_1/kernel']),
                                donor['Conv_1']['kernel'].astype(np.float32))


def test_every_error_is_listed_at_once_and_nothing_is_read(cnn10, odd):
  path, _ = odd
  sources = hooks.Sources()
  with pytest.raises(hooks.HookError) as e:
    hooks.apply(cnn10, [{
        'name': 'warm_start', 'donor': path, 'exclude': ['Dense_7/.*'],
        'rename': [('Dense_5/(.*)', r'Dense_1/\1'), ('Conv_0/(.*)', r'C/\1')],
        'labels': [{'layers': 'Dense_2', 'map': {0: 0}}],
        'opt_state': 'donor'}], rng=RNG, sources=sources)
  message = _cause(e)
  for part in (
      "Key pattern 'Dense_7/.*' matches none of the 8 keys",
      "1 label spec(s) match none of the selected layers:\n  layers='Dense_2' "
      "(did you mean 'Dense_1' or 'Dense_0'?)\n  The selected layers are "
      "['Conv_0', 'Conv_1', 'Dense_0', 'Dense_1']",
      "rename rule ('Dense_5/(.*)', 'Dense_1/\\\\1') matches none of the 8 "
      'selected variables',
      'the donor lacks 2 key(s) for selected variables:\n'
      "  params/Conv_0/bias <- C/bias  (did you mean ['Big/bias', ",
      'the donor has no optimizer state (no opt_state/ keys)',
      f"4 shape mismatch(es) with donor '{path}' (on_shape_mismatch='error'):\n"
      '  params/Dense_0/bias: target (16,), donor Dense_0/bias (12,)\n'
      '  params/Dense_0/kernel: target (32, 16), donor Dense_0/kernel (40, 12)\n'
      '  params/Dense_1/bias: target (10,), donor Dense_1/bias (5,)\n',
      "1 dtype mismatch(es) with donor '" + path + "' (on_dtype_mismatch="
      "'error'):\n  params/Conv_1/kernel: target float32, donor Conv_1/kernel "
      "float16\n  Fix: set on_dtype_mismatch='cast'."):
    assert part in message, part
  assert [r.provenance()['keys_read'] for r in sources.readers()] == [[]]


def test_label_errors_name_the_keys(cnn10, odd):
  path, _ = odd
  with pytest.raises(hooks.HookError) as e:
    _apply(cnn10, {'name': 'copy_params', 'donor': path,
                   'include': ['Dense_1/.*'],
                   'labels': [{'layers': 'Dense_1', 'donor': [0, 1, 2],
                               'map': {11: 0}}]})
  message = _cause(e)
  assert ('3 donor labels but the donor Dense_1/kernel has 5 entries on axis '
          "-1 (layers='Dense_1'); give one label per entry.") in message
  assert 'the donor Dense_1/bias has 5 entries' in message


@pytest.mark.parametrize('params, message', [
    ({'on_shape_mismatch': 'pad'},
     r"copy_params: on_shape_mismatch='pad' is not one of \['error', 'skip', "
     r"'overlap'\]"),
    ({'rename': [('a',)]}, r"rename rule \('a',\) must be \(pattern, donor_path\)"),
    ({'include': 'Conv_0/.*'}, r"include must be a list of regexes, got the string"),
    ({'labels': [{'map': {'7': 2}}]},
     r'copy_params: class_map/map without a named layer \(layers=None\)'),
    ({'labels': [{'layers': 'head', 'classes': [1]}]},
     r"unknown key\(s\) \['classes'\]; it accepts \['axis', 'donor', 'from', "
     r"'layers', 'map', 'target', 'to'\]"),
    ({'labels': [{'layers': 'head', 'donor': [1, 1.5]}]},
     r'donor labels holds 1.5; labels are ints or strings'),
    ({'donor_step': '7'}, r"donor_step '7' must be a step number"),
])
def test_bad_parameters_fail_when_built(params, message):
  with pytest.raises(ValueError, match=message):
    hooks.build({'name': 'copy_params', 'donor': '/nowhere', **params})


def test_factories_do_no_io(tmp_path):
  missing = str(tmp_path / 'missing')
  for name in ('copy_params', 'copy_slots', 'copy_step', 'warm_start'):
    hooks.build({'name': name, 'donor': missing})  # Opens nothing.
  with pytest.raises(hooks.HookError) as e:
    _apply(helpers.make_state(_tx()), {'name': 'copy_step', 'donor': missing})
  assert isinstance(e.value.__cause__, hooks.DonorError)


def test_donor_layouts(tmp_path, cnn10):
  params = jax.tree.map(np.asarray, helpers.init_params(4, 10))
  stats = {'Conv_0': {'mean': np.full(4, 3.0, np.float32),
                      'var': np.full(4, 2.0, np.float32)},
           'Dense_1': {'mean': np.arange(10, dtype=np.float32)}}
  variables = checkpoints.save_msgpack(str(tmp_path / 'v'),
                                       {'params': params, 'batch_stats': stats})
  target = helpers.make_stats_state(_tx(), seed=1, num_classes=10)
  out, _ = _apply(target, {'name': 'copy_params', 'donor': variables})
  np.testing.assert_array_equal(_np(out['batch_stats/Dense_1/mean']),
                                stats['Dense_1']['mean'])
  np.testing.assert_array_equal(_np(out['params/Dense_0/kernel']),
                                params['Dense_0']['kernel'])
  legacy = checkpoints.save_msgpack(str(tmp_path / 'o'), {
      'target': params, 'state': {'step': 3, 'param_states': {}}})
  out, report = _apply(cnn10, {'name': 'copy_params', 'donor': legacy},
                       {'name': 'copy_step', 'donor': legacy})
  np.testing.assert_array_equal(_np(out['params/Conv_1/bias']),
                                params['Conv_1']['bias'])
  assert report.actions('params/Conv_1/bias')[0].source == 'target/Conv_1/bias'
  assert int(out['step']) == 3
