"""Tests for hooks.optim: Adam with a count per tensor (hooks.counts)."""

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
  for count, param in zip(jax.tree.leaves(ours_state[0].count),
                          jax.tree.leaves(PARAMS), strict=True):
    assert count.dtype == jnp.int32
    assert count.shape == (1,) * param.ndim
    np.testing.assert_array_equal(count, 5)


def _counts(shapes):
  """A state hook giving each count the shape ``shapes(path, param shape)``."""
  def init(tx):
    state = tx.init(PARAMS)
    counts = jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.zeros(shapes(jax.tree_util.keystr(path), p.shape),
                                  jnp.int32), PARAMS)
    return (state[0]._replace(count=counts), *state[1:])
  return init


@pytest.mark.parametrize('shapes', [
    lambda path, shape: shape,  # Per-element, as older checkpoints hold.
    lambda path, shape: (1, shape[1]) if 'Dense_0' in path and len(shape) == 2
    else (1,) * len(shape),  # One axis expanded, as after a resize.
], ids=['per_element', 'expanded'])
def test_uniform_counts_of_any_shape_match_optax_bit_for_bit(shapes):
  tx = optim.adam(1e-2)
  params, state = PARAMS, _counts(shapes)(tx)
  theirs_updates, _ = _run(optax.adam(1e-2))
  update = jax.jit(tx.update)
  for i, theirs in enumerate(theirs_updates):
    updates, state = update(_grads(params, i), state, params)
    params = optax.apply_updates(params, updates)
    jax.tree.map(np.testing.assert_array_equal, updates, theirs)
  kernel = state[0].count['Dense_0']['kernel']
  assert kernel.shape == shapes("['Dense_0']['kernel']", (2, 3))
  np.testing.assert_array_equal(kernel, 5)


def test_count_is_one_per_tensor_and_a_slot():
  state = helpers.make_state(optim.adamw(1e-3, weight_decay=0.1))
  flat = flat_lib.flatten(state)
  assert flat['opt_state/0/count/Dense_1/kernel'].shape == (1, 1)
  assert flat['opt_state/0/count/Dense_1/bias'].shape == (1,)
  assert flat['opt_state/0/count/Dense_1/kernel'].dtype == jnp.int32
  assert 'opt_state/0/count' not in flat
  assert flat_lib.slot_index(flat)['params/Dense_1/kernel'] == [
      'opt_state/0/count/Dense_1/kernel',
      'opt_state/0/mu/Dense_1/kernel',
      'opt_state/0/nu/Dense_1/kernel',
  ]


def test_adam_state_is_at_most_2_05_times_the_params():
  state = jax.eval_shape(lambda: helpers.make_state(optim.adam(1e-3)))
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize
                            for x in jax.tree.leaves(tree))
  ratio = nbytes(state.opt_state) / nbytes(state.params)
  assert 2.0 < ratio <= 2.05  # mu, nu and eight int32 counts.


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


def test_fresh_columns_of_an_expanded_count_get_a_first_adam_step():
  # Column 1 of Dense_0/kernel is fresh (zero moments, count 0) after three
  # steps; its count has grown to (1, 3) along the edited axis.
  lr, tx = 1e-2, optim.adam(1e-2)
  grads = _grads(PARAMS, 0)
  state = tx.init(PARAMS)
  update = jax.jit(tx.update)
  for _ in range(3):
    _, state = update(grads, state, PARAMS)
  adam = state[0]
  fresh = lambda x: x.at[:, 1].set(0)
  kernel = lambda tree, value: {**tree, 'Dense_0': {**tree['Dense_0'],
                                                    'kernel': value}}
  adam = adam._replace(
      mu=kernel(adam.mu, fresh(adam.mu['Dense_0']['kernel'])),
      nu=kernel(adam.nu, fresh(adam.nu['Dense_0']['kernel'])),
      count=kernel(adam.count, jnp.array([[3, 0, 3]], jnp.int32)))
  updates, new = update(grads, (adam, *state[1:]), PARAMS)
  got = np.abs(np.asarray(updates['Dense_0']['kernel']))
  np.testing.assert_allclose(got[:, 1], lr, rtol=1e-5)  # g/|g|: no kick.
  np.testing.assert_array_equal(new[0].count['Dense_0']['kernel'], [[4, 1, 4]])
  # The other columns step as if nothing happened.
  untouched, _ = update(grads, state, PARAMS)
  np.testing.assert_array_equal(
      updates['Dense_0']['kernel'][:, [0, 2]],
      untouched['Dense_0']['kernel'][:, [0, 2]])


def test_compact_counts_shrinks_uniform_axes_only():
  state = helpers.make_state()
  flat = flat_lib.flatten(state)
  key = 'opt_state/0/count/Dense_1/kernel'
  columns = np.tile(np.array([7, 7, 7, 0, 0], np.int32), (16, 1))
  flat = {**flat, key: jnp.asarray(columns),
          'opt_state/0/count/Dense_0/kernel': jnp.full((32, 16), 7, jnp.int32)}
  out = optim.compact_counts(flat)
  assert out[key].shape == (1, 5)
  np.testing.assert_array_equal(out[key], [[7, 7, 7, 0, 0]])
  np.testing.assert_array_equal(out['opt_state/0/count/Dense_0/kernel'], [[7]])
  assert out['opt_state/0/count/Dense_0/bias'] is flat[
      'opt_state/0/count/Dense_0/bias']  # Already one per tensor.
  assert all(out[k] is v for k, v in flat.items() if '/count/' not in k)
  # The next update is the same, bit for bit.
  grads = jax.tree.map(jnp.ones_like, state.params)
  update = jax.jit(state.tx.update)
  before, _ = update(grads, flat_lib.unflatten(flat, state).opt_state)
  after, _ = update(grads, flat_lib.unflatten(out, state).opt_state)
  jax.tree.map(np.testing.assert_array_equal, before, after)


def test_reset_slots_get_no_bias_correction_kick():
  ours, lr = _reset_one_param(optim.adam, per_element=True)
  assert np.all(ours <= lr)
  np.testing.assert_allclose(ours, lr, rtol=1e-5)  # The first Adam step: g/|g|.
  # With optax's shared count (500 steps), the same reset overshoots ~2x.
  theirs, _ = _reset_one_param(optax.adam, per_element=False)
  assert np.all(theirs > 1.5 * lr)
