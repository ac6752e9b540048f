"""Tests for hooks.optim: Adam with per-element counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hooks import flat as flat_lib
from hooks import optim
from tests.hooks import helpers

PARAMS = {
    'Dense_0': {'kernel': jnp.arange(6.0).reshape(2, 3) / 7, 'bias': jnp.ones(3)},
    'Dense_1': {'kernel': jnp.linspace(-1.0, 1.0, 6).reshape(3, 2)},
}


def _grads(params, i: int):
  return jax.tree.map(lambda x: jnp.sin(x * (i + 1)) + 0.1 * i, params)


def _run(tx, steps: int = 5):
  params, state = PARAMS, tx.init(PARAMS)
  update = jax.jit(tx.update)
  all_updates = []
  for i in range(steps):
    updates, state = update(_grads(params, i), state, params)
    params = optax.apply_updates(params, updates)
    all_updates.append(updates)
  return all_updates, state


@pytest.mark.parametrize(
    'ours, theirs',
    [
        (optim.adam(1e-2), optax.adam(1e-2)),
        (
            optim.adam(optax.linear_schedule(1e-2, 1e-3, 4), b1=0.8, b2=0.99),
            optax.adam(optax.linear_schedule(1e-2, 1e-3, 4), b1=0.8, b2=0.99),
        ),
        (
            optim.adamw(1e-2, weight_decay=0.1, mask={'Dense_0': {'kernel': True, 'bias': False}, 'Dense_1': {'kernel': True}}),
            optax.adamw(1e-2, weight_decay=0.1, mask={'Dense_0': {'kernel': True, 'bias': False}, 'Dense_1': {'kernel': True}}),
        ),
    ],
)
def test_matches_optax_bit_for_bit(ours, theirs):
  ours_updates, ours_state = _run(ours)
  theirs_updates, theirs_state = _run(theirs)
  for a, b in zip(ours_updates, theirs_updates, strict=True):
    jax.tree.map(np.testing.assert_array_equal, a, b)
  jax.tree.map(np.testing.assert_array_equal, ours_state[0].mu, theirs_state[0].mu)
  jax.tree.map(np.testing.assert_array_equal, ours_state[0].nu, theirs_state[0].nu)
  for count in jax.tree.leaves(ours_state[0].count):
    assert count.dtype == jnp.int32
    np.testing.assert_array_equal(count, np.full(count.shape, 5))


def test_count_mirrors_params_and_is_a_slot():
  state = helpers.make_state(optim.adamw(1e-3, weight_decay=0.1))
  flat = flat_lib.flatten(state)
  assert flat['opt_state/0/count/Dense_1/kernel'].shape == (16, 5)
  assert flat['opt_state/0/count/Dense_1/kernel'].dtype == jnp.int32
  assert 'opt_state/0/count' not in flat
  assert flat_lib.slot_index(flat)['params/Dense_1/kernel'] == [
      'opt_state/0/count/Dense_1/kernel',
      'opt_state/0/mu/Dense_1/kernel',
      'opt_state/0/nu/Dense_1/kernel',
  ]


def test_count_saturates():
  tx = optim.scale_by_adam()
  state = tx.init({'w': jnp.ones(2)})
  big = jnp.iinfo(jnp.int32).max
  state = state._replace(count={'w': jnp.array([big, 3], jnp.int32)})
  _, state = tx.update({'w': jnp.ones(2)}, state)
  np.testing.assert_array_equal(state.count['w'], [big, 4])


def _reset_one_param(tx, *, per_element: bool):
  """Trains 500 steps, zeroes Dense_1/kernel's slots, returns the next update."""
  lr = 1e-2
  tx = tx(lr)
  params = PARAMS
  grads = _grads(params, 0)

  def step(carry, _):
    p, s = carry
    u, s = tx.update(grads, s, p)
    return (optax.apply_updates(p, u), s), None

  (params, state), _ = jax.jit(
      lambda c: jax.lax.scan(step, c, None, length=500)
  )((params, tx.init(params)))
  flat = flat_lib.flatten(state)
  names = ('mu', 'nu', 'count') if per_element else ('mu', 'nu')
  for name in names:
    key = f'0/{name}/Dense_1/kernel'
    flat[key] = jnp.zeros_like(flat[key])
  state = flat_lib.unflatten(flat, state)
  updates, _ = tx.update(grads, state, params)
  return np.abs(np.asarray(updates['Dense_1']['kernel'])), lr


def test_reset_slots_get_no_bias_correction_kick():
  ours, lr = _reset_one_param(optim.adam, per_element=True)
  assert np.all(ours <= lr)
  np.testing.assert_allclose(ours, lr, rtol=1e-5)  # The first Adam step: g/|g|.
  # With optax's shared count (500 steps), the same reset overshoots ~2x.
  theirs, _ = _reset_one_param(optax.adam, per_element=False)
  assert np.all(theirs > 1.5 * lr)
