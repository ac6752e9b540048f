"""Tests for the warm_start hook: copy_params (+ slots) (+ step) in one entry."""

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
LOW = [0, 1, 2, 3, 4]
BODY = ('Conv_0/kernel', 'Conv_0/bias', 'Conv_1/kernel', 'Conv_1/bias',
        'Dense_0/kernel', 'Dense_0/bias')
SLOT = 'opt_state/inner_state/0/{}/{}'
RNG = jax.random.key(0)


_tx = helpers.inject_adam


def _head(donor=LOW, target=TEN):
  """The label spec the trainer passes: its head and its classes."""
  return [{'layers': 'Dense_1', 'donor': list(donor), 'target': list(target)}]


def _np(x):
  return np.asarray(x)


@pytest.fixture(scope='module')
def donor_state():
  """A five-class state after one step: every slot is non-zero."""
  return helpers.jitted_train_step(helpers.make_state(_tx(), seed=3),
                                   *helpers.batch())


@pytest.fixture(scope='module')
def donor_flat(donor_state):
  return {k: _np(v) for k, v in flat_lib.flatten(donor_state).items()}


@pytest.fixture(scope='module')
def donor(tmp_path_factory, donor_state):
  return checkpoints.save_orbax(str(tmp_path_factory.mktemp('donor')),
                                donor_state)


@pytest.fixture(scope='module')
def target():
  return helpers.make_state(_tx(), seed=1, num_classes=10)


def _run(state, **params):
  out, report = hooks.apply(state, [{'name': 'warm_start', **params}], rng=RNG)
  return flat_lib.flatten(out), report


def test_defaults_copy_every_variable_from_an_identical_model(donor, donor_flat):
  state = helpers.make_state(_tx(), seed=1)  # Five classes, like the donor.
  before = flat_lib.flatten(state)
  out, report = _run(state, donor=donor)
  for key in before:
    if key.startswith('params/'):
      np.testing.assert_array_equal(_np(out[key]), donor_flat[key])
      assert report.actions(key)[0].describe() == (
          f'copied from donor key {key}')
    else:  # opt_state='fresh', step='reset'.
      assert out[key] is before[key], key


def test_head_columns_by_label_and_the_body_as_is(target, donor, donor_flat):
  out, report = _run(target, donor=donor, labels=_head(donor=[5, 6, 7, 8, 9]))
  before = flat_lib.flatten(target)
  for path in BODY:
    np.testing.assert_array_equal(_np(out['params/' + path]),
                                  donor_flat['params/' + path])
  for name in ('kernel', 'bias'):
    key = f'params/Dense_1/{name}'
    np.testing.assert_array_equal(_np(out[key])[..., 5:], donor_flat[key])
    np.testing.assert_array_equal(_np(out[key])[..., :5],
                                  _np(before[key])[..., :5])
  assert report.actions('params/Dense_1/kernel')[0].detail == (
      'columns by label: 5..9 <- donor columns 0..4; new: 0..4 (kept)')


def test_labels_follow_the_target_order(target, donor, donor_flat):
  out, _ = _run(target, donor=donor, labels=_head(target=TEN[::-1]))
  np.testing.assert_array_equal(_np(out['params/Dense_1/kernel'])[:, 5:],
                                donor_flat['params/Dense_1/kernel'][:, ::-1])


def test_donor_slots_and_step_move_like_the_params(target, donor, donor_flat):
  out, report = _run(target, donor=donor, labels=_head(), opt_state='donor',
                     step='donor')
  for kind in ('mu', 'nu', 'count'):
    for path in BODY:
      key = SLOT.format(kind, path)
      np.testing.assert_array_equal(_np(out[key]), donor_flat[key])
      assert report.actions(key)[0].source == key
    key = SLOT.format(kind, 'Dense_1/kernel')
    donor_value = np.broadcast_to(donor_flat[key], (16, 5))  # Count: (1, 1).
    np.testing.assert_array_equal(_np(out[key])[:, :5],
                                  donor_value[:np.shape(out[key])[0]])
    np.testing.assert_array_equal(_np(out[key])[:, 5:], 0)  # Fresh slots.
  # The head's count grew along the labelled axis only.
  assert np.shape(out[SLOT.format('count', 'Dense_1/kernel')]) == (1, 10)
  assert np.abs(donor_flat[SLOT.format('mu', 'Dense_1/kernel')]).sum() > 0
  for key in ('step', 'opt_state/count',
              'opt_state/hyperparams_states/learning_rate/count'):
    assert int(out[key]) == 1, key
  # Not a count: the target's configured learning rate stays.
  assert out['opt_state/hyperparams/learning_rate'] is flat_lib.flatten(
      target)['opt_state/hyperparams/learning_rate']


def test_new_columns_take_a_first_adam_step_no_larger_than_the_rate(
    target, donor):
  state, _ = hooks.apply(target, [{'name': 'warm_start', 'donor': donor,
                                   'labels': _head(), 'opt_state': 'donor'}],
                         rng=RNG)
  after = helpers.jitted_train_step(state, *helpers.batch(1, num_classes=10))
  delta = np.abs(_np(after.params['Dense_1']['kernel'])
                 - _np(state.params['Dense_1']['kernel']))
  assert 0 < delta[:, 5:].max() <= 1e-2 * (1 + 1e-5)  # Count 0: no kick.


def test_the_same_as_its_pieces_bit_for_bit(target, donor):
  whole, _ = _run(target, donor=donor, labels=_head(), opt_state='donor',
                  step='donor')
  pieces, report = hooks.apply(target, [
      {'name': 'copy_params', 'donor': donor, 'labels': _head()},
      {'name': 'copy_slots', 'donor': donor, 'labels': _head()},
      {'name': 'copy_step', 'donor': donor}], rng=RNG)
  pieces = flat_lib.flatten(pieces)
  for key in whole:
    assert _np(whole[key]).tobytes() == _np(pieces[key]).tobytes(), key
  assert len(report.sources) == 1  # The donor was opened once.


def test_plan_mode_reads_nothing(target, donor):
  report = hooks.plan(target, [{'name': 'warm_start', 'donor': donor,
                                'labels': _head(), 'opt_state': 'donor'}],
                      rng=RNG)
  assert report.sources[0]['keys_read'] == []
  assert report.actions(SLOT.format('nu', 'Dense_1/kernel'))[1].describe() == (
      'resized (16, 5) -> (16, 10)')


def test_donor_slots_into_a_frozen_target(donor, donor_flat):
  tx = hooks.freeze(_tx(), helpers.init_params(1, 10), ['Conv_.*'])
  state = helpers.make_state(tx, seed=1, num_classes=10)
  out, report = _run(state, donor=donor, labels=_head(), opt_state='donor')
  key = ('opt_state/inner_states/trainable/inner_state/inner_state/0/mu/'
         'Dense_1/kernel')
  np.testing.assert_array_equal(_np(out[key])[:, :5],
                                donor_flat[SLOT.format('mu', 'Dense_1/kernel')])
  np.testing.assert_array_equal(_np(out['params/Conv_0/kernel']),
                                donor_flat['params/Conv_0/kernel'])


def test_a_head_of_other_size_without_labels_is_a_listed_shape_error(
    target, donor):
  with pytest.raises(hooks.HookError) as e:
    _run(target, donor=donor, opt_state='donor', step='donor')
  message = str(e.value.__cause__)
  assert message.startswith("warm_start: 2 shape mismatch(es) with donor '")
  assert ('  params/Dense_1/bias: target (10,), donor params/Dense_1/bias (5,)\n'
          '  params/Dense_1/kernel: target (16, 10), donor '
          'params/Dense_1/kernel (16, 5)\n') in message


def test_errors_of_every_piece_at_once(target, donor):
  with pytest.raises(hooks.HookError) as e:
    _run(target, donor=donor, include=['Conv_.*', 'Dense_1/.*'],
         labels=[{'layers': 'Dense_1', 'map': {11: 0, 3: 8}}],
         opt_state='donor', step='donor',
         rename=[('Conv_1/(.*)', r'Conv_9/\1')])
  message = str(e.value.__cause__)
  assert ('map {11: 0, 3: 8} for params/Dense_1/bias: target label(s) [11] '
          'not in the labels [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]; donor label(s) '
          '[8] not in the labels [0, 1, 2, 3, 4].') in message
  assert 'the donor lacks 2 key(s) for selected variables:\n' in message
  assert '  params/Conv_1/bias <- params/Conv_9/bias  (did you mean' in message


def test_bad_parameters_fail_when_built():
  cases = [
      ({'opt_state': 'keep'},
       r"warm_start: opt_state='keep' is not one of \['fresh', 'donor'\]"),
      ({'step': 'zero'}, r"step='zero' is not one of \['reset', 'donor'\]"),
      ({'labels': [{'donor': LOW, 'target': TEN}]},
       r'class_map/map without a named layer'),
      ({'head': 'Dense_1'}, r"unknown parameter\(s\) \['head'\]"),
  ]
  for params, message in cases:
    with pytest.raises(ValueError, match=message):
      hooks.build({'name': 'warm_start', 'donor': '/nowhere', **params})
