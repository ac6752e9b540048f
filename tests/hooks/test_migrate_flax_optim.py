"""Tests for the migrate_flax_optim hook: legacy flax.optim checkpoints to optax."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax.training import train_state

import hooks
from hooks import api
from hooks import flat as flat_lib
from hooks import optim
from hooks import validation
from tests import legacy as legacy_lib
from tests.hooks import checkpoints
from tests.hooks import helpers



class SeedCNN(nn.Module):
  """The seed document's CNN, with its final log_softmax."""

  @nn.compact
  def __call__(self, x):
    x = nn.avg_pool(nn.relu(nn.Conv(32, (3, 3))(x)), (2, 2), strides=(2, 2))
    x = nn.avg_pool(nn.relu(nn.Conv(64, (3, 3))(x)), (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(256)(x))
    return nn.log_softmax(nn.Dense(10)(x))


def _nll(params, apply_fn, images, labels):
  logp = apply_fn({'params': params}, images)
  return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


@jax.jit
def _step(state, images, labels):
  grads = jax.grad(_nll)(state.params, state.apply_fn, images, labels)
  return state.apply_gradients(grads=grads)


def _migrate(legacy_flat, target_state, abstract=False):
  target = flat_lib.flatten(target_state)
  del abstract  # Abstract leaves make an abstract run.
  return hooks.run_flat(
      legacy_flat, [{'name': 'migrate_flax_optim'}],
      expected=validation.expected_structure(target), rng=jax.random.key(0),
      fresh=lambda: dict(target), validate_each=False)


def test_adam_fixture_reproduces_the_next_step():
  legacy_lib.require()
  legacy = flat_lib.flatten_raw(legacy_lib.read(legacy_lib.CHECKPOINT))
  reference = legacy_lib.reference()
  model = SeedCNN()
  params = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 28, 28, 1)))['params']
  tx = optax.inject_hyperparams(optim.adam)(
      learning_rate=optax.constant_schedule(1e-3), b1=0.9, b2=0.999, eps=1e-8)
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  out, report = _migrate(legacy, state)
  assert int(out['step']) == 20 and int(out['opt_state/count']) == 20
  assert int(out['opt_state/hyperparams_states/learning_rate/count']) == 20
  np.testing.assert_array_equal(out['opt_state/inner_state/0/count/Dense_1/kernel'], 20)
  np.testing.assert_array_equal(out['opt_state/inner_state/0/nu/Conv_0/bias'],
                                legacy['state/param_states/Conv_0/bias/grad_sq_ema'])
  assert report.actions('opt_state/inner_state/0/mu/Dense_0/kernel')[0].describe() == (
      'migrated from state/param_states/Dense_0/kernel/grad_ema')
  assert out['opt_state/hyperparams/learning_rate'] is flat_lib.flatten(state)[
      'opt_state/hyperparams/learning_rate']

  migrated = flat_lib.unflatten(out, state)
  batch = reference['batch']
  after = _step(migrated, jnp.asarray(batch['image']), jnp.asarray(batch['label']))
  legacy_lib.assert_next_step(flat_lib.flatten(after.params))


def _legacy_momentum(params, momentum, step):
  return {
      'target': params,
      'state': {'step': np.int32(step),
                'param_states': jax.tree.map(lambda m: {'momentum': m}, momentum)},
  }


@pytest.fixture(scope='module')
def momentum_case(tmp_path_factory):
  params = jax.tree.map(np.asarray, helpers.init_params(4))
  rng = np.random.default_rng(0)
  momentum = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
  path = str(tmp_path_factory.mktemp('legacy') / 'checkpoint_7')
  checkpoints.save_msgpack(path, _legacy_momentum(params, momentum, 7))
  tx = optax.sgd(0.1, momentum=0.9)
  state = helpers.make_state(tx)
  return path, params, momentum, state


def test_momentum_migrates_to_trace_and_steps_like_sgd(momentum_case):
  path, params, momentum, state = momentum_case
  donor = hooks.open_donor(path)
  legacy = donor.read(list(donor.structure()))
  out, report = _migrate(legacy, state)
  for key, m in flat_lib.flatten(momentum).items():
    np.testing.assert_array_equal(out[f'opt_state/0/trace/{key}'], m)
    np.testing.assert_array_equal(out[f'params/{key}'], flat_lib.flatten(params)[key])
  assert report.actions('opt_state/0/trace/Conv_0/kernel')[0].source == (
      'state/param_states/Conv_0/kernel/momentum')
  assert int(out['step']) == 7

  migrated = flat_lib.unflatten(out, state)
  images, labels = helpers.batch()
  after = helpers.jitted_train_step(migrated, images, labels)
  grads = jax.grad(helpers.loss_fn)(migrated.params, migrated.apply_fn, images, labels)
  # flax.optim.Momentum: m' = 0.9 m + g; p' = p - lr m'.
  expected = jax.tree.map(lambda p, m, g: p - 0.1 * (0.9 * m + g), params, momentum, grads)
  for key, value in flat_lib.flatten(expected).items():
    np.testing.assert_allclose(flat_lib.flatten(after.params)[key], value, rtol=1e-5, atol=1e-7)


def test_plan_mode(momentum_case):
  path, _, _, state = momentum_case
  donor = hooks.open_donor(path)
  abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in donor.structure().items()}
  out, _ = _migrate(abstract, helpers.abstract(state), abstract=True)
  assert out['opt_state/0/trace/Dense_0/kernel'] == jax.ShapeDtypeStruct((32, 16), np.float32)


def _adam_legacy():
  state = helpers.make_state()  # hooks.optim.adam: mu, nu and count slots.
  flat = flat_lib.flatten(state)
  legacy = {'state/step': np.int32(3)}
  for key, value in flat.items():
    if key.startswith('params/'):
      path = key[len('params/'):]
      legacy['target/' + path] = np.asarray(value)
      legacy[f'state/param_states/{path}/grad_ema'] = np.ones(value.shape, np.float32)
      legacy[f'state/param_states/{path}/grad_sq_ema'] = np.ones(value.shape, np.float32)
  return legacy, state


def test_errors_list_every_missing_and_misshapen_slot():
  legacy, state = _adam_legacy()
  del legacy['state/param_states/Conv_0/bias/grad_sq_ema']
  del legacy['state/param_states/Dense_1/kernel/grad_ema']
  legacy['state/param_states/Dense_0/bias/grad_ema'] = np.ones((3,), np.float32)
  del legacy['target/Conv_1/bias']
  target = flat_lib.flatten(state)
  fn = hooks.build({'name': 'migrate_flax_optim'})
  ctx = api.Context(validation.expected_structure(target), jax.random.key(0), lambda: target)
  with pytest.raises(ValueError) as e:
    fn(legacy, ctx)
  message = str(e.value)
  assert message.startswith(
      'migrate_flax_optim: the legacy checkpoint does not fit the target optimizer state.\n'
      '3 missing from the legacy checkpoint:\n'
      "  param target/Conv_1/bias  (did you mean ['target/Conv_0/bias', ")
  assert ('  slot state/param_states/Conv_0/bias/grad_sq_ema for opt_state/0/nu/Conv_0/bias '
          "(legacy slots of Conv_0/bias: ['grad_ema'])") in message
  assert 'slot state/param_states/Dense_1/kernel/grad_ema for opt_state/0/mu/Dense_1/kernel' in message
  assert ('1 slot(s) of the wrong shape:\n  state/param_states/Dense_0/bias/grad_ema: (3,), '
          'but its param target/Dense_0/bias is (16,)') in message


def test_errors_for_other_layouts():
  legacy, state = _adam_legacy()
  target = flat_lib.flatten(state)
  fn = hooks.build({'name': 'migrate_flax_optim'})
  ctx = api.Context(validation.expected_structure(target), jax.random.key(0), lambda: target)
  with pytest.raises(ValueError, match=(
      r"the input is not a legacy flax.optim checkpoint: expected keys 'target/<param>', "
      r"'state/step' and 'state/param_states/<param>/<slot>', got step, params/Conv_0/bias")):
    fn(target, ctx)
  legacy['target/Extra/w'] = np.zeros(2)
  with pytest.raises(ValueError, match=r"1 legacy param\(s\) the target does not have: \['Extra/w'\]"):
    fn(legacy, ctx)
  sgd = flat_lib.flatten(helpers.make_state(optax.sgd(0.1, momentum=0.9)))
  del legacy['target/Extra/w']
  ctx = api.Context(validation.expected_structure(sgd), jax.random.key(0), lambda: sgd)
  with pytest.raises(ValueError, match=r"missing from the legacy checkpoint:\n  slot state/param_states/\w+/\w+/momentum"):
    fn(legacy, ctx)


def test_optax_adam_scalar_count_comes_from_step():
  legacy, _ = _adam_legacy()
  state = helpers.make_state(optax.adam(1e-2))  # One shared scalar count.
  out, report = _migrate(legacy, state)
  assert out['opt_state/0/count'].dtype == np.int32 and int(out['opt_state/0/count']) == 3
  assert report.actions('opt_state/0/count')[0].source == 'state/step'
  np.testing.assert_array_equal(out['opt_state/0/nu/Dense_1/kernel'], 1.0)
