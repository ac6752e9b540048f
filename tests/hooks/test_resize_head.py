"""Tests for the resize_head hook: a head's columns kept by class label."""

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
FIVE = [0, 1, 2, 3, 4]
SLOT = 'opt_state/inner_state/0/{}/Dense_1/{}'
RNG = jax.random.key(0)


_tx = helpers.inject_adam


def _np(x):
  return np.asarray(x)


@pytest.fixture(scope='module')
def five_state():
  """A five-class state after one step (slots non-zero, counts 1)."""
  return helpers.jitted_train_step(helpers.make_state(_tx(), seed=3),
                                   *helpers.batch())


@pytest.fixture(scope='module')
def five(five_state):
  return flat_lib.flatten(five_state)


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory, five_state):
  return checkpoints.save_orbax(str(tmp_path_factory.mktemp('five')),
                                five_state)


def _ten():
  return helpers.make_state(_tx(), seed=1, num_classes=10)


@pytest.fixture(scope='module')
def ten():
  return flat_lib.flatten(_ten())


def _restore(checkpoint, target, dry_run=False, **params):
  """Restores the five-class checkpoint into ``target`` through the hook."""
  entry = {'name': 'resize_head', 'layer': 'Dense_1', 'from_classes': FIVE,
           'to_classes': TEN, **params}
  state, report = hooks.restore(checkpoint, target, [entry], rng=RNG,
                                fresh=_ten, dry_run=dry_run)
  return flat_lib.flatten(state), report


def test_grow_five_to_ten_keeps_columns_and_slots_by_label(checkpoint, five,
                                                           ten):
  out, report = _restore(checkpoint, _ten())
  for name in ('kernel', 'bias'):
    key = f'params/Dense_1/{name}'
    np.testing.assert_array_equal(_np(out[key])[..., :5], _np(five[key]))
    np.testing.assert_array_equal(_np(out[key])[..., 5:],
                                  _np(ten[key])[..., 5:])  # init='init'.
    for kind in ('mu', 'nu'):
      slot = SLOT.format(kind, name)
      new = _np(out[slot])
      assert new.shape == ten[slot].shape and new.dtype == ten[slot].dtype
      assert new[..., :5].tobytes() == _np(five[slot]).tobytes()  # Bitwise.
      np.testing.assert_array_equal(new[..., 5:], 0)  # Fresh: zeros.
  # The counts grow along the edited axis only: kept columns at 1, new at 0.
  count = SLOT.format('count', 'kernel')
  assert ten[count].shape == _np(five[count]).shape == (1, 1)
  np.testing.assert_array_equal(_np(out[count]), [[1] * 5 + [0] * 5])
  assert _np(out[count]).dtype == np.int32
  np.testing.assert_array_equal(_np(out[SLOT.format('count', 'bias')]),
                                [1] * 5 + [0] * 5)
  assert [a.describe() for a in report.actions(count)] == [
      'resized (1, 1) -> (1, 10) (columns by label: 0..4 <- incoming '
      'columns 0..4; new: 5..9 (init))']
  assert [a.describe() for a in report.actions('params/Dense_1/kernel')] == [
      'resized (16, 5) -> (16, 10) (columns by label: 0..4 <- incoming '
      'columns 0..4; new: 5..9 (init))']
  assert report.actions(SLOT.format('nu', 'bias'))[0].detail == (
      'entries by label: 0..4 <- incoming entries 0..4; new: 5..9 (init)')
  for key in five:
    if 'Dense_1' not in key:
      np.testing.assert_array_equal(_np(out[key]), _np(five[key]))


def test_new_columns_take_a_first_adam_step_no_larger_than_the_rate(
    checkpoint):
  target = _ten()
  out, _ = _restore(checkpoint, target)
  state = flat_lib.unflatten(out, target)
  after = helpers.jitted_train_step(state, *helpers.batch(1, num_classes=10))
  delta = np.abs(_np(after.params['Dense_1']['kernel'])
                 - _np(state.params['Dense_1']['kernel']))
  assert 0 < delta[:, 5:].max() <= 1e-2 * (1 + 1e-5)  # Count 0: no kick.


def test_shrink_and_reorder_drops_classes(tmp_path, ten):
  path = checkpoints.save_orbax(str(tmp_path), _ten())
  five = helpers.make_state(_tx(), seed=3)
  state, report = hooks.restore(path, five, [{
      'name': 'resize_head', 'layer': 'Dense_1', 'from_classes': TEN,
      'to_classes': [9, 7, 5, 3, 1], 'init': 'zeros'}], rng=RNG)
  np.testing.assert_array_equal(_np(state.params['Dense_1']['kernel']),
                                _np(ten['params/Dense_1/kernel'])[:, 9::-2])
  assert report.actions('params/Dense_1/kernel')[0].describe() == (
      'resized (16, 10) -> (16, 5) (columns by label: 0 (9) <- incoming '
      'column 9, 1 (7) <- incoming column 7, 2 (5) <- incoming column 5, '
      '3 (3) <- incoming column 3, 4 (1) <- incoming column 1; dropped: '
      'incoming columns 0, 2, 4, 6, 8)')


@pytest.mark.parametrize('init', ['zeros', 'mean'])
def test_other_inits(checkpoint, five, init):
  out, _ = _restore(checkpoint, _ten(), init=init, from_classes=[9, 8, 7, 6, 5])
  kernel, old = _np(out['params/Dense_1/kernel']), _np(five['params/Dense_1/kernel'])
  np.testing.assert_array_equal(kernel[:, 5:], old[:, ::-1])
  expected = (np.zeros((16, 5)) if init == 'zeros'
              else np.repeat(old.mean(-1, keepdims=True), 5, -1))
  np.testing.assert_allclose(kernel[:, :5], expected, rtol=1e-6)


def test_plan_mode_reads_nothing(checkpoint):
  out, report = _restore(checkpoint, _ten(), dry_run=True)
  assert out[SLOT.format('nu', 'kernel')].shape == (16, 10)
  assert report.actions('params/Dense_1/bias')[0].from_shape == (5,)
  assert report.sources[0]['keys_read'] == []


def test_same_classes_change_nothing():
  state = helpers.make_state(_tx(), seed=1)
  out, _ = hooks.apply(state, [{'name': 'resize_head', 'layer': 'Dense_1',
                                'from_classes': FIVE, 'to_classes': FIVE}],
                       rng=RNG)
  before, after = flat_lib.flatten(state), flat_lib.flatten(out)
  assert all(after[k] is before[k] for k in before)


@pytest.mark.parametrize('params, message', [
    ({'to_classes': [0, 1, 2]},
     'resize_head: 3 target labels but the target params/Dense_1/bias has 10 '
     "entries on axis -1 (layers='Dense_1'); give one label per entry."),
    ({'from_classes': [0, 1, 2, 3]},
     'resize_head: 4 incoming labels but the incoming params/Dense_1/bias has '
     '5 entries'),
    ({'layer': 'Dense_2'},
     "resize_head: 1 label spec(s) match none of the layers:\n  "
     "layers='Dense_2' (did you mean 'Dense_1' or 'Dense_0'?)\n  The layers "
     "are ['Conv_0', 'Conv_1', 'Dense_0', 'Dense_1']"),
])
def test_errors_when_run(checkpoint, params, message):
  entry = {'name': 'resize_head', 'layer': 'Dense_1', 'from_classes': FIVE,
           'to_classes': TEN, **params}
  with pytest.raises(hooks.HookError) as e:
    hooks.restore(checkpoint, _ten(), [entry], rng=RNG, fresh=_ten)
  assert message in str(e.value.__cause__)


@pytest.mark.parametrize('params, message', [
    ({'from_classes': [1, 2, 1, 3, 3]},
     r'resize_head: from_classes \[1, 2, 1, 3, 3\] repeats label\(s\) \[1, 3\]'),
    ({'init': 'random'},
     r"resize_head: init='random' is not one of \['init', 'zeros', 'mean'\]"),
    ({'layer': None}, r"resize_head: layer None must name the head layer"),
])
def test_errors_when_built(params, message):
  entry = {'name': 'resize_head', 'layer': 'Dense_1', 'from_classes': FIVE,
           'to_classes': TEN, **params}
  with pytest.raises(ValueError, match=message):
    hooks.build(entry)


def test_the_head_layer_has_no_default():
  with pytest.raises(ValueError, match=(
      r"Hook 'resize_head' is missing required parameter\(s\) \['layer'\]")):
    hooks.build({'name': 'resize_head', 'from_classes': FIVE,
                 'to_classes': TEN})
