"""Tests for the warm_start hook: copying from a donor checkpoint."""

from __future__ import annotations

import hashlib

import jax
import numpy as np
import optax
import pytest

import hooks
from hooks import api
from hooks import flat as flat_lib
from hooks import optim
from hooks import validation
from tests.hooks import checkpoints
from tests.hooks import helpers

TEN = tuple(range(10))
BODY = ('Conv_0/kernel', 'Conv_0/bias', 'Conv_1/kernel', 'Conv_1/bias',
        'Dense_0/kernel', 'Dense_0/bias')
SLOT = 'opt_state/inner_state/0/{}/{}'
EMPTY_DIGEST = hashlib.sha256().hexdigest()


def _tx():
  return optax.inject_hyperparams(optim.adam)(learning_rate=optax.constant_schedule(1e-2))


@pytest.fixture(scope='module')
def donor_state():
  """A five-class state after one step: every slot is non-zero."""
  return helpers.jitted_train_step(helpers.make_state(_tx(), seed=3), *helpers.batch())


@pytest.fixture(scope='module')
def donor_flat(donor_state):
  return {k: np.asarray(v) for k, v in flat_lib.flatten(donor_state).items()}


@pytest.fixture(scope='module')
def low(tmp_path_factory, donor_state):
  """A donor on digits 0-4."""
  return checkpoints.save_orbax(str(tmp_path_factory.mktemp('low')), donor_state)


@pytest.fixture(scope='module')
def high(tmp_path_factory, donor_state):
  """The same tensors, recorded as digits 5-9."""
  return checkpoints.save_orbax(
      str(tmp_path_factory.mktemp('high')), donor_state, classes=(5, 6, 7, 8, 9)
  )


@pytest.fixture(scope='module')
def target():
  """A fresh ten-class state, flat."""
  return flat_lib.flatten(helpers.make_state(_tx(), seed=1, num_classes=10))


def _ctx(flat, classes=TEN, abstract=False):
  return api.Context(
      validation.expected_structure(flat), jax.random.key(0), lambda: dict(flat),
      classes=classes, abstract=abstract,
  )


def _run(flat, classes=TEN, **params):
  ctx = _ctx(flat, classes)
  out = hooks.run_hooks(flat, [{'name': 'warm_start', **params}], ctx, validate_each=True)
  return out, ctx.report


def _call(flat, classes=TEN, **params):
  """Calls the hook directly, so errors are the hook's own."""
  return hooks.build({'name': 'warm_start', **params})(flat, _ctx(flat, classes))


def _np(x):
  return np.asarray(x)


def test_low_donor_fills_rows_0_to_4_and_copies_the_body(target, low, donor_flat):
  out, report = _run(target, donor=low)
  for path in BODY:
    np.testing.assert_array_equal(_np(out['params/' + path]), donor_flat['params/' + path])
    assert report.actions('params/' + path)[0].describe() == (
        f'copied from donor key params/{path}')
  kernel, bias = _np(out['params/Dense_1/kernel']), _np(out['params/Dense_1/bias'])
  assert kernel.shape == (16, 10)
  np.testing.assert_array_equal(kernel[:, :5], donor_flat['params/Dense_1/kernel'])
  np.testing.assert_array_equal(kernel[:, 5:], _np(target['params/Dense_1/kernel'])[:, 5:])
  np.testing.assert_array_equal(bias[:5], donor_flat['params/Dense_1/bias'])
  np.testing.assert_array_equal(bias[5:], _np(target['params/Dense_1/bias'])[5:])
  assert [a.describe() for a in report.actions('params/Dense_1/kernel')] == [
      'copied from donor key params/Dense_1/kernel', 'resized (16, 5) -> (16, 10)']
  # opt_state='fresh', step='reset': the optimizer state is the target's own.
  for key in target:
    if not key.startswith('params/'):
      assert out[key] is target[key], key
  assert report.actions(SLOT.format('mu', 'Dense_1/kernel')) == [api.Action('unchanged')]


def test_high_donor_fills_rows_5_to_9(target, high, donor_flat):
  out, _ = _run(target, donor=high)
  kernel = _np(out['params/Dense_1/kernel'])
  np.testing.assert_array_equal(kernel[:, 5:], donor_flat['params/Dense_1/kernel'])
  np.testing.assert_array_equal(kernel[:, :5], _np(target['params/Dense_1/kernel'])[:, :5])


def test_labels_follow_the_target_order(target, high, donor_flat):
  # Target rows are digits 9..0: digit 9 is row 0 and takes donor row 4.
  out, _ = _run(target, classes=TEN[::-1], donor=high)
  kernel = _np(out['params/Dense_1/kernel'])
  np.testing.assert_array_equal(kernel[:, :5], donor_flat['params/Dense_1/kernel'][:, ::-1])


def test_explicit_class_map(target, low, donor_flat):
  out, _ = _run(target, donor=low, class_map={'7': 2, 0: 4})  # Config keys are strings.
  kernel, fresh = _np(out['params/Dense_1/kernel']), _np(target['params/Dense_1/kernel'])
  donor = donor_flat['params/Dense_1/kernel']
  np.testing.assert_array_equal(kernel[:, 7], donor[:, 2])
  np.testing.assert_array_equal(kernel[:, 0], donor[:, 4])
  others = [i for i in range(10) if i not in (0, 7)]
  np.testing.assert_array_equal(kernel[:, others], fresh[:, others])


def test_donor_slots_and_step_move_like_the_params(target, low, donor_flat):
  out, report = _run(target, donor=low, opt_state='donor', step='donor')
  validation.check_structure(out, validation.expected_structure(target))
  for name in ('mu', 'nu', 'count'):
    for path in BODY:
      key = SLOT.format(name, path)
      np.testing.assert_array_equal(_np(out[key]), donor_flat[key])
      assert report.actions(key)[0] == api.Action('copied', source=key, hook='warm_start')
    key = SLOT.format(name, 'Dense_1/kernel')
    slot = _np(out[key])
    assert slot.shape == (16, 10)
    np.testing.assert_array_equal(slot[:, :5], donor_flat[key])
    np.testing.assert_array_equal(slot[:, 5:], 0)
  assert (donor_flat[SLOT.format('count', 'Dense_1/kernel')] == 1).all()
  assert np.abs(donor_flat[SLOT.format('mu', 'Dense_1/kernel')]).sum() > 0
  for key in ('step', 'opt_state/count', 'opt_state/hyperparams_states/learning_rate/count'):
    assert int(out[key]) == 1 and report.actions(key)[0].action == 'copied', key
  # Not a count: the target's configured learning rate stays.
  assert out['opt_state/hyperparams/learning_rate'] is target['opt_state/hyperparams/learning_rate']


def test_reads_only_what_it_copies(target, low):
  fn = hooks.build({'name': 'warm_start', 'donor': low, 'include': ['Conv_0/.*']})
  out = fn(target, _ctx(target))
  only = hooks.open_donor(low)
  only.read(['params/Conv_0/kernel', 'params/Conv_0/bias'])
  assert fn.donor.digest() == only.digest()
  assert out['params/Conv_1/kernel'] is target['params/Conv_1/kernel']


def test_plan_mode_reads_no_arrays(target, low):
  abstract = helpers.abstract(target)
  fn = hooks.build({'name': 'warm_start', 'donor': low, 'opt_state': 'donor'})
  ctx = _ctx(abstract, abstract=True)
  out = hooks.run_hooks(abstract, [fn], ctx, validate_each=True)
  assert fn.donor.digest() == EMPTY_DIGEST
  assert all(isinstance(v, jax.ShapeDtypeStruct) for v in out.values())
  assert ctx.report.actions(SLOT.format('nu', 'Dense_1/kernel'))[1].describe() == (
      'resized (16, 5) -> (16, 10)')


# A msgpack donor of bare-layout params with other sizes: Dense_0 is (40, 12).
@pytest.fixture(scope='module')
def odd(tmp_path_factory, donor_flat):
  params = flat_lib.flatten(helpers.init_params(2))
  tree = {'params': {}}
  for path, value in params.items():
    layer, name = path.split('/')
    tree['params'].setdefault(layer, {})[name] = np.asarray(value)
  rng = np.random.default_rng(0)
  tree['params']['Dense_0'] = {
      'kernel': rng.normal(size=(40, 12)).astype(np.float32),
      'bias': rng.normal(size=(12,)).astype(np.float32),
  }
  tree['params']['Conv_1']['kernel'] = tree['params']['Conv_1']['kernel'].astype(np.float16)
  tree['params']['Big'] = tree['params']['Dense_0']
  path = str(tmp_path_factory.mktemp('odd') / 'params.msgpack')
  return checkpoints.save_msgpack(path, tree), tree['params']


def test_overlap_copies_the_common_slice(target, odd):
  path, donor = odd
  out, report = _run(target, donor=path, include=['Dense_0/.*'], on_shape_mismatch='overlap')
  kernel, fresh = _np(out['params/Dense_0/kernel']), _np(target['params/Dense_0/kernel'])
  np.testing.assert_array_equal(kernel[:, :12], donor['Dense_0']['kernel'][:32, :12])
  np.testing.assert_array_equal(kernel[:, 12:], fresh[:, 12:])
  np.testing.assert_array_equal(_np(out['params/Dense_0/bias'])[:12], donor['Dense_0']['bias'])
  np.testing.assert_array_equal(_np(out['params/Dense_0/bias'])[12:],
                                _np(target['params/Dense_0/bias'])[12:])
  assert [a.describe() for a in report.actions('params/Dense_0/kernel')] == [
      'copied from donor key params/Dense_0/kernel', 'resized (40, 12) -> (32, 16)']


def test_rename_rule_with_its_own_policy_and_skip(target, odd):
  path, donor = odd
  out, report = _run(
      target, donor=path, include=['Conv_0/.*', 'Dense_0/.*'],
      rename=[('Dense_0/(.*)', r'Big/\1', 'overlap')], on_shape_mismatch='skip')
  np.testing.assert_array_equal(_np(out['params/Dense_0/bias'])[:12], donor['Big']['bias'])
  assert report.actions('params/Dense_0/bias')[0].source == 'params/Big/bias'
  np.testing.assert_array_equal(_np(out['params/Conv_0/kernel']), donor['Conv_0']['kernel'])
  out, report = _run(target, donor=path, include=['Dense_0/.*'], on_shape_mismatch='skip')
  assert out['params/Dense_0/kernel'] is target['params/Dense_0/kernel']
  assert report.actions('params/Dense_0/kernel') == [api.Action('unchanged')]


def test_dtype_cast(target, odd):
  path, donor = odd
  out, _ = _run(target, donor=path, include=['Conv_1/kernel'], on_dtype_mismatch='cast')
  assert out['params/Conv_1/kernel'].dtype == np.float32
  np.testing.assert_array_equal(_np(out['params/Conv_1/kernel']),
                                donor['Conv_1']['kernel'].astype(np.float32))


def test_donor_without_classes_takes_class_map_as_rows(target, odd):
  path, donor = odd
  out, _ = _run(target, donor=path, include=['Dense_1/.*'], class_map={9: 0})
  np.testing.assert_array_equal(_np(out['params/Dense_1/kernel'])[:, 9],
                                donor['Dense_1']['kernel'][:, 0])


@pytest.mark.parametrize('params, message', [
    ({'include': ['Conv_0/.*', 'Conv_9/.*']}, r"'Conv_9/\.\*' matches none of the 8 keys"),
    ({'exclude': ['Dense_7/.*']}, r"'Dense_7/\.\*' matches none of the 8 keys"),
    ({'rename': [('Dense_5/(.*)', r'Dense_1/\1')]},
     r"rename rule \('Dense_5/\(\.\*\)', 'Dense_1/\\\\1'\) matches none of the 8 selected"),
    ({'rename': [('Dense_0/(.*)', r'Dense_9/\1')]},
     r"lacks 2 key\(s\) for selected params:\n  Dense_0/bias <- params/Dense_9/bias  \(did you mean "),
    ({'class_map': {11: 0, 3: 8}},
     r"class_map \{11: 0, 3: 8\}: target digit\(s\) \[11\] not in the target classes "
     r"\[0, 1, .*, 9\]; donor digit\(s\) \[8\] not in the donor classes \[0, 1, 2, 3, 4\]"),
])
def test_errors_against_the_low_donor(target, low, params, message):
  fn = hooks.build({'name': 'warm_start', 'donor': low, **params})
  with pytest.raises(ValueError, match=message):
    fn(target, _ctx(target))
  assert fn.donor.digest() == EMPTY_DIGEST  # Nothing was read.


def test_shape_error_lists_every_mismatch(target, odd):
  path, _ = odd
  fn = hooks.build({'name': 'warm_start', 'donor': path, 'exclude': ['Dense_1/.*'],
                    'on_dtype_mismatch': 'cast'})
  with pytest.raises(ValueError) as e:
    fn(target, _ctx(target))
  assert (
      "2 shape mismatch(es) with donor '" + path + "' (on_shape_mismatch='error'):\n"
      '  params/Dense_0/bias: target (16,), donor params/Dense_0/bias (12,)\n'
      '  params/Dense_0/kernel: target (32, 16), donor params/Dense_0/kernel (40, 12)\n'
  ) in str(e.value)
  assert fn.donor.digest() == EMPTY_DIGEST


def test_dtype_error(target, odd):
  path, _ = odd
  with pytest.raises(ValueError, match=(
      r"1 dtype mismatch\(es\) .*\n  params/Conv_1/kernel: target float32, donor "
      r"params/Conv_1/kernel float16\n  Fix: set on_dtype_mismatch='cast'")):
    _call(target, donor=path, include=['Conv_1/.*'])


def test_head_by_label_needs_donor_and_target_classes(target, odd, low):
  path, _ = odd
  with pytest.raises(ValueError, match=(
      r"records no classes, so head params/Dense_1/\w+ cannot be copied by digit "
      r"label. Pass class_map=\{target digit: donor digit\}")):
    _call(target, donor=path, include=['Dense_1/.*'])
  with pytest.raises(ValueError, match=r"The target has no class labels \(ctx.classes is empty\)"):
    _call(target, classes=(), donor=low)


def test_opt_state_donor_needs_the_donor_slots(target, odd):
  path, _ = odd
  with pytest.raises(ValueError, match=(
      r"opt_state='donor': donor '.*' lacks the slots of 6 target slot\(s\):\n"
      r"  opt_state/inner_state/0/count/Conv_0/bias \(donor has no slots for "
      r"params/Conv_0/bias\)\n(.*\n){5}  Fix: use opt_state='fresh'")):
    _call(target, donor=path, include=['Conv_0/.*'], opt_state='donor')


def test_bad_parameters_fail_when_built(low, tmp_path):
  with pytest.raises(ValueError, match=r"on_shape_mismatch='pad' is not one of \['error', 'skip', 'overlap'\]"):
    hooks.build({'name': 'warm_start', 'donor': low, 'on_shape_mismatch': 'pad'})
  with pytest.raises(ValueError, match=r"rename rule \('a',\) must be \(pattern, donor_key\)"):
    hooks.build({'name': 'warm_start', 'donor': low, 'rename': [('a',)]})
  with pytest.raises(hooks.DonorError, match='does not exist'):
    hooks.build({'name': 'warm_start', 'donor': str(tmp_path / 'missing')})


def test_donor_slots_into_a_frozen_target(low, donor_flat):
  params = helpers.init_params(1, 10)
  tx = hooks.freeze(_tx(), params, ['Conv_.*'])
  target = flat_lib.flatten(helpers.make_state(tx, seed=1, num_classes=10))
  out, report = _run(target, donor=low, opt_state='donor')
  key = 'opt_state/inner_states/trainable/inner_state/inner_state/0/mu/Dense_1/kernel'
  np.testing.assert_array_equal(_np(out[key])[:, :5], donor_flat[SLOT.format('mu', 'Dense_1/kernel')])
  assert report.actions(key)[0].source == SLOT.format('mu', 'Dense_1/kernel')
  np.testing.assert_array_equal(_np(out['params/Conv_0/kernel']), donor_flat['params/Conv_0/kernel'])
