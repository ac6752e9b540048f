"""Tests for hooks.freeze: freezing through the optimizer, and unfreezing."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hooks
from hooks import flat as flat_lib
from hooks import optim
from hooks import schedule as schedule_lib
from tests.hooks import helpers

# hooks/__init__ exports the function `freeze`, which shadows the module.
freeze_lib = importlib.import_module('hooks.freeze')

FROZEN_SLOT = 'opt_state/inner_states/trainable/inner_state/0/{}/{}'


def _base_tx():
  return optim.adamw(1e-2, weight_decay=0.1)


def _params_equal(a, b) -> bool:
  return all(
      np.array_equal(x, y, equal_nan=True)
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def test_freeze_labels_and_no_slots_for_frozen_params():
  params = helpers.init_params()
  labels = freeze_lib.freeze_labels(params, ['Conv_.*', 'Dense_0/kernel'])
  assert flat_lib.flatten(labels) == {
      'Conv_0/bias': 'frozen', 'Conv_0/kernel': 'frozen',
      'Conv_1/bias': 'frozen', 'Conv_1/kernel': 'frozen',
      'Dense_0/bias': 'trainable', 'Dense_0/kernel': 'frozen',
      'Dense_1/bias': 'trainable', 'Dense_1/kernel': 'trainable',
  }
  state = helpers.make_state(freeze_lib.freeze(_base_tx(), params, ['Conv_.*']))
  index = flat_lib.slot_index(flat_lib.flatten(state))
  assert index['params/Conv_0/kernel'] == []
  assert index['params/Dense_1/kernel'] == [
      FROZEN_SLOT.format(name, 'Dense_1/kernel') for name in ('count', 'mu', 'nu')
  ]


def test_freeze_with_no_patterns_is_the_optimizer_itself():
  tx = _base_tx()
  assert freeze_lib.freeze(tx, helpers.init_params(), []) is tx


def test_freeze_errors():
  params = helpers.init_params()
  with pytest.raises(ValueError, match=r"'Conv_9/.*' matches none of the 8 keys"):
    freeze_lib.freeze(_base_tx(), params, ['Conv_9/.*'])
  with pytest.raises(ValueError, match='match all 8 params: nothing left to train'):
    freeze_lib.freeze(_base_tx(), params, ['Conv_.*', 'Dense_.*'])


def test_frozen_params_stay_bit_identical_under_weight_decay():
  params = helpers.init_params()
  state = helpers.make_state(freeze_lib.freeze(_base_tx(), params, ['Conv_.*', 'Dense_0/.*']))
  step = jax.jit(helpers.train_step)
  start = state.params
  for i in range(5):
    state = step(state, *helpers.batch(i))
  for layer in ('Conv_0', 'Conv_1', 'Dense_0'):
    assert _params_equal(state.params[layer], start[layer]), layer
  assert not np.array_equal(state.params['Dense_1']['kernel'], start['Dense_1']['kernel'])


def test_schedule_parse_and_phases():
  schedule = schedule_lib.FreezeSchedule.parse(
      {'100': ['Conv_.*'], 0: ['Conv_.*', 'Dense_0/.*'], 200: []}
  )
  assert schedule.boundaries == (0, 100, 200)
  assert schedule.phase_at(0) == ('Conv_.*', 'Dense_0/.*')
  assert schedule.phase_at(99) == ('Conv_.*', 'Dense_0/.*')
  assert schedule.phase_at(100) == ('Conv_.*',)
  assert schedule.phase_at(10_000) == ()
  assert [schedule.phase_index(s) for s in (0, 150, 250)] == [0, 1, 2]
  late = schedule_lib.FreezeSchedule.parse({5: ['Conv_.*']})
  assert late.phase_at(4) == () and late.phase_index(4) == -1


@pytest.mark.parametrize(
    'schedule, message',
    [
        ({-1: []}, 'step -1 must be >= 0'),
        ({'x': []}, "step 'x' must be a non-negative integer"),
        ({True: []}, 'step True must be'),
        ({0: 'Conv_.*'}, r"must be a list of regexes, e.g. \['Conv_.\*'\]"),
        ({0: ['Conv_(']}, r"'Conv_\(' is not a valid regex"),
        ({0: [], '0': []}, 'gives step 0 twice'),
    ],
)
def test_schedule_errors(schedule, message):
  with pytest.raises(ValueError, match=message):
    schedule_lib.FreezeSchedule.parse(schedule)


def test_unfreeze_carries_slots_and_traces_once_per_phase():
  schedule = schedule_lib.FreezeSchedule.parse(
      {0: ['Conv_.*', 'Dense_0/.*'], 3: ['Conv_.*'], 6: []}
  )
  base = _base_tx()
  traces = []

  def counted_step(state, images, labels):
    traces.append(1)  # Runs only while tracing.
    return helpers.train_step(state, images, labels)

  step = jax.jit(counted_step)
  state = helpers.make_state(schedule.tx_at(0, base, helpers.init_params()))
  snapshots = {}
  for i in range(9):
    if i in schedule.boundaries and i > 0:
      old_flat = flat_lib.flatten(state)
      new_tx = schedule.tx_at(i, base, state.params)
      opt_state = freeze_lib.carry_opt_state(old_flat, new_tx, state.params)
      state = state.replace(tx=new_tx, opt_state=opt_state)
      snapshots[i] = (old_flat, flat_lib.flatten(state))
    state = step(state, *helpers.batch(i))
  assert len(traces) == 3

  # Step 3: Dense_0 unfreezes; Dense_1 carries on.
  old, new = snapshots[3]
  for name in ('count', 'mu', 'nu'):
    key = FROZEN_SLOT.format(name, 'Dense_1/kernel')
    assert new[key] is old[key]
    fresh = new[FROZEN_SLOT.format(name, 'Dense_0/kernel')]
    np.testing.assert_array_equal(fresh, np.zeros(fresh.shape))
  np.testing.assert_array_equal(old[FROZEN_SLOT.format('count', 'Dense_1/kernel')], 3)
  assert not any('Conv' in k for k in new if k.startswith('opt_state/'))

  # Step 6: the plain optimizer; every old slot is carried to its plain key.
  old, new = snapshots[6]
  for key, value in old.items():
    if key.startswith('opt_state/'):
      assert new[key.replace('inner_states/trainable/inner_state/', '')] is value
  np.testing.assert_array_equal(new['opt_state/0/count/Conv_0/kernel'], 0)
  np.testing.assert_array_equal(new['opt_state/0/count/Dense_0/kernel'], 3)
  np.testing.assert_array_equal(state.opt_state[0].count['Dense_1']['kernel'], 9)
  np.testing.assert_array_equal(state.opt_state[0].count['Conv_0']['kernel'], 3)


def test_freezing_carries_a_count_that_surgery_grew():
  state = helpers.make_state(optim.adam(1e-2))
  flat = flat_lib.flatten(state)
  grown = jnp.array([[3, 3, 3, 0, 0]], jnp.int32)  # As after a resize.
  flat['opt_state/0/count/Dense_1/kernel'] = grown
  state = flat_lib.unflatten(flat, state)
  frozen = hooks.freeze_state(state, ['Conv_0/.*'])
  carried = flat_lib.flatten(frozen)[FROZEN_SLOT.format('count',
                                                        'Dense_1/kernel')]
  assert carried is grown
  thawed = flat_lib.flatten(hooks.freeze_state(frozen, []))
  assert thawed['opt_state/0/count/Dense_1/kernel'] is grown
  np.testing.assert_array_equal(thawed['opt_state/0/count/Conv_0/kernel'], 0)


def test_carry_keeps_schedule_count_and_checks_shapes():
  params = helpers.init_params()
  tx = optim.adam(optax.linear_schedule(1e-2, 0.0, 100))
  state = helpers.make_state(tx)
  for i in range(2):
    state = helpers.jitted_train_step(state, *helpers.batch(i))
  new_tx = freeze_lib.freeze(tx, params, ['Conv_0/.*'])
  old_opt = flat_lib.flatten(state.opt_state)
  carried = flat_lib.flatten(freeze_lib.carry_opt_state(old_opt, new_tx, params))
  assert carried['inner_states/trainable/inner_state/1/count'] is old_opt['1/count']
  assert 'inner_states/trainable/inner_state/0/mu/Conv_0/kernel' not in carried
  old_opt['0/mu/Dense_1/kernel'] = jnp.zeros((3, 3))
  with pytest.raises(ValueError, match=r"'inner_states/trainable/inner_state/0/mu/Dense_1/kernel': old shape \(3, 3\), new \(16, 5\)"):
    freeze_lib.carry_opt_state(old_opt, new_tx, params)


def test_xla_drops_gradient_work_of_frozen_params():
  base = _base_tx()
  full = helpers.make_state(base)
  frozen = helpers.make_state(freeze_lib.freeze(base, full.params, ['Conv_.*']))
  images, labels = helpers.batch()

  def compiled(state):
    return jax.jit(helpers.train_step).lower(state, images, labels).compile()

  full_c, frozen_c = compiled(full), compiled(frozen)
  if jax.default_backend() == 'cpu':  # GPUs lower convolutions to custom calls.
    # Forward: 2 convolutions. Full backward adds 2 filter grads, 1 input grad.
    assert full_c.as_text().count('convolution(') == 5
    assert frozen_c.as_text().count('convolution(') == 2
  full_flops = full_c.cost_analysis()['flops']
  frozen_flops = frozen_c.cost_analysis()['flops']
  assert frozen_flops < 0.6 * full_flops, (frozen_flops, full_flops)


def test_freeze_uses_optax_partition_and_refreezes_from_the_base():
  params = helpers.init_params()
  tx = freeze_lib.freeze(_base_tx(), params, ['Conv_.*'])
  assert isinstance(tx.init(params), optax.PartitionState)
  again = freeze_lib.freeze(tx, params, ['Dense_0/.*'])
  assert again.base is tx.base
  assert freeze_lib.freeze(tx, params, []) is tx.base


def test_freeze_state_in_a_plain_loop_keeps_edited_slots():
  state = helpers.jitted_train_step(helpers.make_state(_base_tx()), *helpers.batch())
  # Surgery edits slots (here: a marker value in one slot of a trainable param).
  marked = state.opt_state[0].mu['Dense_1']['kernel'] + 123.0
  opt_state = (state.opt_state[0]._replace(
      mu={**state.opt_state[0].mu, 'Dense_1': {**state.opt_state[0].mu['Dense_1'],
                                                'kernel': marked}}),
               *state.opt_state[1:])
  state = state.replace(opt_state=opt_state)
  frozen = hooks.freeze_state(state, ['Conv_.*'])
  flat = flat_lib.flatten(frozen)
  assert flat[FROZEN_SLOT.format('mu', 'Dense_1/kernel')] is marked
  assert not any('Conv_' in k for k in flat if k.startswith('opt_state/'))
  # tx and opt_state agree: a step runs, frozen params stay bit-identical.
  stepped = helpers.jitted_train_step(frozen, *helpers.batch(1))
  assert _params_equal(stepped.params['Conv_0'], state.params['Conv_0'])
  assert not _params_equal(stepped.params['Dense_1'], state.params['Dense_1'])
  # Unfreezing: the carried slots stay, the convolutions' slots are fresh.
  thawed = hooks.freeze_state(stepped, [])
  assert thawed.tx is frozen.tx.base
  thawed_flat = flat_lib.flatten(thawed)
  np.testing.assert_array_equal(thawed_flat['opt_state/0/count/Conv_0/kernel'], 0)
  assert (thawed_flat['opt_state/0/mu/Dense_1/kernel']
          is flat_lib.flatten(stepped)[FROZEN_SLOT.format('mu', 'Dense_1/kernel')])
