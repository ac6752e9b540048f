"""Tests for the resize_head hook: head rows kept by digit label."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax
import pytest

import hooks
from hooks import api
from hooks import flat as flat_lib
from hooks import optim
from hooks import validation
from tests.hooks import helpers

TEN = tuple(range(10))
SLOT = 'opt_state/inner_state/0/{}/Dense_1/{}'


@dataclasses.dataclass
class FakeDonor:
  """The checkpoint being restored, as the trainer passes it in pre_restore."""

  classes: tuple[int, ...] | None
  path: str = '/runs/five/checkpoints/1'


def _tx():
  return optax.inject_hyperparams(optim.adam)(learning_rate=optax.constant_schedule(1e-2))


@pytest.fixture(scope='module')
def five_state():
  """A five-class state after one step (slots non-zero, counts 1)."""
  return helpers.jitted_train_step(helpers.make_state(_tx(), seed=3), *helpers.batch())


@pytest.fixture(scope='module')
def five(five_state):
  return flat_lib.flatten(five_state)


@pytest.fixture(scope='module')
def ten_state():
  return helpers.make_state(_tx(), seed=1, num_classes=10)


@pytest.fixture(scope='module')
def ten(ten_state):
  return flat_lib.flatten(ten_state)


def _ctx(target, classes, donor=None, abstract=False):
  return api.Context(
      validation.expected_structure(target), jax.random.key(0), lambda: dict(target),
      classes=classes, donor=donor, abstract=abstract,
  )


def _run(flat, target, classes=TEN, donor=FakeDonor((0, 1, 2, 3, 4)), abstract=False, **params):
  ctx = _ctx(target, classes, donor, abstract)
  out = hooks.run_hooks(flat, [{'name': 'resize_head', **params}], ctx)
  return out, ctx.report


def _np(x):
  return np.asarray(x)


def test_grow_five_to_ten_keeps_rows_and_slots_by_label(five, ten):
  out, report = _run(five, ten)  # from_classes: the donor's (0-4).
  for name in ('kernel', 'bias'):
    key = f'params/Dense_1/{name}'
    new = _np(out[key])
    np.testing.assert_array_equal(new[..., :5], _np(five[key]))
    np.testing.assert_array_equal(new[..., 5:], _np(ten[key])[..., 5:])  # init='init'.
    assert report.actions(key)[0].describe() == (
        'resized (16, 5) -> (16, 10)' if name == 'kernel' else 'resized (5,) -> (10,)')
    for slot in ('mu', 'nu', 'count'):
      slot_key = SLOT.format(slot, name)
      new = _np(out[slot_key])
      assert new.shape == ten[slot_key].shape and new.dtype == ten[slot_key].dtype
      np.testing.assert_array_equal(new[..., :5], _np(five[slot_key]))
      np.testing.assert_array_equal(new[..., 5:], 0)
      assert report.actions(slot_key)[0].action == 'resized'
  np.testing.assert_array_equal(_np(out[SLOT.format('count', 'kernel')])[:, :5], 1)
  for key in five:
    if 'Dense_1' not in key:
      assert out[key] is five[key], key


def test_new_rows_take_a_first_adam_step_no_larger_than_the_learning_rate(five, ten, ten_state):
  out, _ = _run(five, ten)
  state = flat_lib.unflatten(out, ten_state)
  after = helpers.jitted_train_step(state, *helpers.batch(1, num_classes=10))
  delta = np.abs(_np(after.params['Dense_1']['kernel']) - _np(state.params['Dense_1']['kernel']))
  assert delta[:, 5:].max() <= 1e-2 * (1 + 1e-5)  # Fresh count 0: no kick.
  assert delta[:, 5:].max() > 0


def test_target_order_and_shrinking_drops_classes(ten):
  # Ten incoming digits 0-9 into a head for digits (7, 2): rows 7 and 2.
  two = flat_lib.flatten(helpers.make_state(_tx(), num_classes=2))
  out, report = _run(ten, two, classes=(7, 2), donor=FakeDonor(TEN), init='zeros')
  kernel = _np(out['params/Dense_1/kernel'])
  np.testing.assert_array_equal(kernel, _np(ten['params/Dense_1/kernel'])[:, [7, 2]])
  assert report.actions('params/Dense_1/kernel')[0].describe() == 'resized (16, 10) -> (16, 2)'


@pytest.mark.parametrize('init', ['zeros', 'mean'])
def test_other_inits(five, ten, init):
  out, _ = _run(five, ten, init=init, from_classes=[9, 8, 7, 6, 5])
  kernel, old = _np(out['params/Dense_1/kernel']), _np(five['params/Dense_1/kernel'])
  np.testing.assert_array_equal(kernel[:, 5:], old[:, ::-1])
  expected = np.zeros((16, 5)) if init == 'zeros' else np.repeat(old.mean(-1, keepdims=True), 5, -1)
  np.testing.assert_allclose(kernel[:, :5], expected, rtol=1e-6)


def test_plan_mode(five, ten):
  out, report = _run(helpers.abstract(five), helpers.abstract(ten), abstract=True)
  assert out[SLOT.format('nu', 'kernel')] == jax.ShapeDtypeStruct((16, 10), np.float32)
  assert report.actions('params/Dense_1/bias')[0].describe() == 'resized (5,) -> (10,)'


def test_same_classes_change_nothing(five):
  out = hooks.build({'name': 'resize_head', 'from_classes': [0, 1, 2, 3, 4]})(
      five, _ctx(five, (0, 1, 2, 3, 4)))
  assert all(out[k] is five[k] for k in five)


@pytest.mark.parametrize('params, donor, message', [
    ({}, None, r"the incoming head's classes are unknown: pass from_classes=\[...\] .*ctx.donor is None"),
    ({}, FakeDonor(None), r"from_classes=\[...\] .*the checkpoint '/runs/five/checkpoints/1' records no classes"),
    ({'from_classes': [0, 1, 2]}, None,
     r"from_classes \[0, 1, 2\] names 3 classes but params/Dense_1/bias has shape \(5,\)"),
    ({'layer': 'Dense_2', 'from_classes': [0, 1, 2, 3, 4]}, None,
     r"no params under 'params/Dense_2/'. Did you mean 'Dense_1'\?"),
])
def test_errors_when_run(five, ten, params, donor, message):
  fn = hooks.build({'name': 'resize_head', **params})
  with pytest.raises(ValueError, match=message):
    fn(five, _ctx(ten, TEN, donor))


def test_errors_when_built():
  with pytest.raises(ValueError, match=r"from_classes \[1, 2, 1, 3, 3\] repeats digit\(s\) \[1, 3\]"):
    hooks.build({'name': 'resize_head', 'from_classes': [1, 2, 1, 3, 3]})
  with pytest.raises(ValueError, match=r"init='random' is not one of \['zeros', 'init', 'mean'\]"):
    hooks.build({'name': 'resize_head', 'init': 'random'})
