"""Tests for hooks.flat: flat keys, round trips and the slot index."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax.training import train_state
from hypothesis import strategies as st

from hooks import flat as flat_lib
from hooks import optim
from hooks import validation
from tests.hooks import helpers

SETTINGS = hypothesis.settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)


@dataclasses.dataclass(frozen=True)
class Case:
  """An optimizer and the slot keys it should give each param."""

  name: str
  tx: optax.GradientTransformation
  slots: Callable[[str], list[str]]  # param path (no 'params/') -> slot keys


# ---------------------------------------------------------------- strategies


@st.composite
def param_trees(draw) -> dict[str, Any]:
  """1-3 layers, each with a kernel and maybe a bias, tiny shapes."""
  n = draw(st.integers(1, 3))
  tree = {}
  for i in range(n):
    kind = draw(st.sampled_from(['Dense', 'Conv']))
    name = f'{kind}_{i}'
    d_in, d_out = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    shape = (d_in, d_out) if kind == 'Dense' else (2, 2, d_in, d_out)
    layer = {'kernel': jnp.full(shape, i + 1.0)}
    if draw(st.booleans()):
      layer['bias'] = jnp.zeros((d_out,))
    if draw(st.booleans()):  # A nested submodule.
      layer['sub'] = {'scale': jnp.ones((d_out,))}
    tree[name] = layer
  return tree


def _paths(params) -> list[str]:
  return list(flat_lib.flatten(params))


def _label_tree(params, labels: list[Any]):
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, labels[: len(leaves)])


def _adam_slots(prefix: str, count: bool = False):
  names = ['count', 'mu', 'nu'] if count else ['mu', 'nu']
  return lambda p: [f'{prefix}/{n}/{p}' for n in names]


@st.composite
def cases(draw, params) -> Case:
  n = len(jax.tree.leaves(params))
  kind = draw(
      st.sampled_from([
          'sgd', 'momentum', 'adam', 'adamw', 'clip_adam', 'multi_transform',
          'masked', 'inject', 'hooks_adam', 'hooks_adamw_masked',
      ])
  )
  lr = optax.linear_schedule(1e-2, 0.0, 10)
  if kind == 'sgd':
    return Case(kind, optax.sgd(1e-2), lambda p: [])
  if kind == 'momentum':
    return Case(kind, optax.sgd(1e-2, 0.9), lambda p: [f'opt_state/0/trace/{p}'])
  if kind == 'adam':
    return Case(kind, optax.adam(lr), _adam_slots('opt_state/0'))
  if kind == 'adamw':
    return Case(kind, optax.adamw(1e-2), _adam_slots('opt_state/0'))
  if kind == 'clip_adam':
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    return Case(kind, tx, _adam_slots('opt_state/1/0'))
  if kind == 'hooks_adam':
    return Case(kind, optim.adam(lr), _adam_slots('opt_state/0', count=True))
  labels = draw(st.lists(st.sampled_from(['a', 'm', 'z']), min_size=n, max_size=n))
  paths = _paths(params)
  by_path = dict(zip(paths, labels))
  if kind == 'multi_transform':
    tx = optax.multi_transform(
        {'a': optax.adam(1e-2), 'm': optax.sgd(1e-2, 0.9), 'z': optax.set_to_zero()},
        _label_tree(params, labels),
    )

    def slots(p):
      label = by_path[p]
      if label == 'a':
        return _adam_slots('opt_state/inner_states/a/inner_state/0')(p)
      if label == 'm':
        return [f'opt_state/inner_states/m/inner_state/0/trace/{p}']
      return []

    return Case(kind, tx, slots)
  mask = [label != 'z' for label in labels]
  by_mask = dict(zip(paths, mask))
  if kind == 'masked':
    tx = optax.masked(optax.adam(1e-2), _label_tree(params, mask))
    return Case(
        kind, tx,
        lambda p: _adam_slots('opt_state/inner_state/0')(p) if by_mask[p] else [],
    )
  if kind == 'hooks_adamw_masked':
    tx = optim.adamw(1e-2, weight_decay=0.1, mask=_label_tree(params, mask))
    return Case(kind, tx, _adam_slots('opt_state/0', count=True))
  assert kind == 'inject'
  tx = optax.inject_hyperparams(optax.adam)(learning_rate=lr)
  return Case(kind, tx, _adam_slots('opt_state/inner_state/0'))


@st.composite
def states(draw):
  params = draw(param_trees())
  case = draw(cases(params))
  state = train_state.TrainState.create(apply_fn=None, params=params, tx=case.tx)
  if draw(st.booleans()):  # One step, so the slots are not all zeros.
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
    state = state.apply_gradients(grads=grads)
  return state, case


# ------------------------------------------------------------------ properties


@SETTINGS
@hypothesis.given(states())
def test_round_trip_is_exact_and_shares_leaves(state_case):
  state, _ = state_case
  flat = flat_lib.flatten(state)
  rebuilt = flat_lib.unflatten(flat, state)
  assert type(rebuilt) is train_state.TrainState
  assert rebuilt.tx is state.tx and rebuilt.apply_fn is state.apply_fn
  assert jax.tree.structure(rebuilt) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(state), strict=True):
    assert a is b
  assert all(flat_lib.flatten(rebuilt)[k] is v for k, v in flat.items())


@SETTINGS
@hypothesis.given(states())
def test_keys_and_slot_index(state_case):
  state, case = state_case
  flat = flat_lib.flatten(state)
  assert all('MaskedNode' not in k and 'EmptyState' not in k for k in flat)
  param_paths = _paths(state.params)
  assert [k for k in flat if k.startswith('params/')] == [
      f'params/{p}' for p in param_paths
  ]
  index = flat_lib.slot_index(flat)
  assert set(index) == {f'params/{p}' for p in param_paths}
  for p in param_paths:
    assert index[f'params/{p}'] == sorted(case.slots(p)), case.name
    for slot in index[f'params/{p}']:
      shape = np.shape(flat[f'params/{p}'])
      if '/count/' in slot:  # hooks.optim: one count per tensor.
        assert np.shape(flat[slot]) == (1,) * len(shape)
      else:
        assert np.shape(flat[slot]) == shape
  # Every other optimizer leaf is a scalar (counts, hyperparams).
  slots = {s for v in index.values() for s in v}
  others = [k for k in flat if k.startswith('opt_state/') and k not in slots]
  assert all(np.shape(flat[k]) == () for k in others), others


@SETTINGS
@hypothesis.given(states())
def test_raw_msgpack_gives_the_live_keys(state_case):
  state, _ = state_case
  raw = flax.serialization.msgpack_restore(flax.serialization.to_bytes(state))
  flat_raw = flat_lib.flatten_raw(raw)
  live = flat_lib.flatten(state)
  assert set(flat_raw) == set(live)
  validation.check_structure(flat_raw, validation.expected_structure(live))
  for k, v in flat_raw.items():
    assert isinstance(v, np.ndarray), k
    np.testing.assert_array_equal(v, np.asarray(live[k]))


@SETTINGS
@hypothesis.given(states())
def test_abstract_round_trip(state_case):
  state, _ = state_case
  abstract_state = jax.eval_shape(lambda: state)
  flat = flat_lib.flatten(abstract_state)
  assert all(isinstance(v, jax.ShapeDtypeStruct) for v in flat.values())
  assert list(flat) == list(flat_lib.flatten(state))
  rebuilt = flat_lib.unflatten(flat_lib.flatten(state), abstract_state)
  assert all(a is b for a, b in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(state)))


# --------------------------------------------------------------- exact cases


def test_train_state_keys_exact():
  state = helpers.make_state(optax.adam(1e-3))
  flat = flat_lib.flatten(state)
  assert list(flat)[:3] == ['step', 'params/Conv_0/bias', 'params/Conv_0/kernel']
  assert 'opt_state/0/count' in flat
  assert 'opt_state/0/mu/Dense_1/kernel' in flat
  assert flat['step'] == 0 and flat['params/Dense_1/kernel'].shape == (16, 5)
  assert not any('apply_fn' in k or k.startswith('tx') for k in flat)
  assert flat_lib.slot_index(flat)['params/Dense_1/kernel'] == [
      'opt_state/0/mu/Dense_1/kernel',
      'opt_state/0/nu/Dense_1/kernel',
  ]


def test_multi_transform_and_inject_keys_exact():
  params = {'a': {'kernel': jnp.ones((2, 3))}, 'b': jnp.ones((2,))}
  tx = optax.multi_transform(
      {'x': optax.inject_hyperparams(optax.adam)(learning_rate=0.1),
       'z': optax.set_to_zero()},
      {'a': {'kernel': 'x'}, 'b': 'z'},
  )
  state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
  assert list(flat_lib.flatten(state.opt_state)) == [
      'inner_states/x/inner_state/count',
      'inner_states/x/inner_state/hyperparams/b1',
      'inner_states/x/inner_state/hyperparams/b2',
      'inner_states/x/inner_state/hyperparams/eps',
      'inner_states/x/inner_state/hyperparams/eps_root',
      'inner_states/x/inner_state/hyperparams/learning_rate',
      'inner_states/x/inner_state/inner_state/0/count',
      'inner_states/x/inner_state/inner_state/0/mu/a/kernel',
      'inner_states/x/inner_state/inner_state/0/nu/a/kernel',
  ]
  assert flat_lib.slot_index(flat_lib.flatten(state)) == {
      'params/a/kernel': [
          'opt_state/inner_states/x/inner_state/inner_state/0/mu/a/kernel',
          'opt_state/inner_states/x/inner_state/inner_state/0/nu/a/kernel',
      ],
      'params/b': [],
  }


def test_empty_states_have_no_keys():
  assert flat_lib.flatten(optax.EmptyState()) == {}
  assert flat_lib.flatten(()) == {}
  assert flat_lib.flatten(optax.sgd(0.1).init({'w': jnp.ones(2)})) == {}


def test_slot_index_longest_param_path_wins():
  flat = {
      'params/a/kernel': np.ones((2,)),
      'params/b/a/kernel': np.ones((2,)),
      'opt_state/0/mu/a/kernel': np.ones((2,)),
      'opt_state/0/mu/b/a/kernel': np.ones((2,)),
      'opt_state/0/nu/b/a/kernel': np.ones((3,)),  # Wrong shape: not a slot.
  }
  assert flat_lib.slot_index(flat) == {
      'params/a/kernel': ['opt_state/0/mu/a/kernel'],
      'params/b/a/kernel': ['opt_state/0/mu/b/a/kernel'],
  }


def test_flatten_raw_normalises_scalars_and_drops_none():
  raw = {'step': 3, 'opt_state': [None, {'lr': np.float32(0.5), 'ok': True}],
         'params': {'w': np.ones(2)}}
  flat = flat_lib.flatten_raw(raw)
  assert list(flat) == ['opt_state/1/lr', 'opt_state/1/ok', 'params/w', 'step']
  assert flat['step'].shape == () and flat['step'] == 3
  assert isinstance(flat['opt_state/1/lr'], np.ndarray)
  assert flat['opt_state/1/lr'].dtype == np.float32
  assert flat['params/w'] is raw['params']['w']


def test_int_and_digit_keys_agree():
  live = (optax.EmptyState(), {'w': np.ones(1)})
  assert flat_lib.flatten(live) == {'1/w': live[1]['w']}
  assert list(flat_lib.flatten_raw({'1': {'w': 1.0}})) == ['1/w']
  assert list(flat_lib.flatten_raw({1: {'w': 1.0}})) == ['1/w']
  assert list(flat_lib.flatten_raw([None, {'w': 1.0}])) == ['1/w']


def test_colliding_keys_raise():
  with pytest.raises(ValueError, match="flat key 'a/b'"):
    flat_lib.flatten({'a/b': np.ones(1), 'a': {'b': np.ones(1)}})


def test_unflatten_reports_missing_and_unexpected_keys():
  state = helpers.make_state()
  flat = flat_lib.flatten(state)
  flat['params/Dense_1/w'] = flat.pop('params/Dense_1/kernel')
  with pytest.raises(validation.StructureError) as info:
    flat_lib.unflatten(flat, state)
  assert info.value.missing == ['params/Dense_1/kernel']
  assert info.value.unexpected == ['params/Dense_1/w']
  assert "(did you mean 'params/Dense_1/w'?)" in str(info.value)


def test_unflatten_reports_an_extra_key_alone():
  state = helpers.make_state()
  flat = {**flat_lib.flatten(state), 'params/extra': np.ones(1)}
  with pytest.raises(validation.StructureError) as info:
    flat_lib.unflatten(flat, state)
  assert (info.value.missing, info.value.unexpected) == ([], ['params/extra'])


def test_flatten_with_rebuild_is_flatten_and_unflatten():
  state = helpers.make_state()
  flat, rebuild = flat_lib.flatten_with_rebuild(state)
  assert list(flat) == list(flat_lib.flatten(state))
  assert all(flat[k] is v for k, v in flat_lib.flatten(state).items())
  new = {**flat, 'step': np.array(7, np.int32)}
  rebuilt = rebuild(new)
  assert type(rebuilt) is train_state.TrainState
  assert rebuilt.tx is state.tx and int(rebuilt.step) == 7
  assert all(flat_lib.flatten(rebuilt)[k] is v for k, v in new.items())
  new['params/Dense_1/w'] = new.pop('params/Dense_1/kernel')
  with pytest.raises(validation.StructureError) as info:
    rebuild(new)
  assert info.value.missing == ['params/Dense_1/kernel']
  assert info.value.unexpected == ['params/Dense_1/w']


def test_orbax_restore_without_target_gives_live_keys(tmp_path):
  params = helpers.init_params()
  labels = jax.tree.map_with_path(
      lambda p, _: 'z' if 'Conv' in flat_lib.key_of(p) else 'a', params
  )
  tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.multi_transform({'a': optim.adam(0.1), 'z': optax.set_to_zero()}, labels),
  )
  state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / 'ckpt', state)
    ckptr.wait_until_finished()
    raw = ckptr.restore(tmp_path / 'ckpt')
  live = flat_lib.flatten(state)
  flat_raw = flat_lib.flatten_raw(raw)
  assert set(flat_raw) == set(live)
  assert 'opt_state/1/inner_states/a/inner_state/0/count/Dense_1/kernel' in live
  assert not any('Conv' in k for k in live if k.startswith('opt_state'))
  validation.check_structure(flat_raw, validation.expected_structure(live))
