"""Tests for the rename hook: params and their slots move together."""

from __future__ import annotations

import jax
import pytest

import hooks
from hooks import api
from hooks import flat as flat_lib
from hooks import validation
from tests.hooks import helpers


@pytest.fixture(scope='module')
def flat():
  return flat_lib.flatten(helpers.make_state())


def _run(flat, expected, **params):
  return hooks.run_flat(flat, [{'name': 'rename', **params}],
                        expected=expected, rng=jax.random.key(0),
                        validate_each=False)


def _renamed(flat, old, new):
  return {k.replace(old, new): v for k, v in flat.items()}


def test_renames_params_and_slots_keeping_values_and_order(flat):
  expected = validation.expected_structure(_renamed(flat, 'Dense_1/', 'head/'))
  out, report = _run(flat, expected, rules=[('Dense_1/(.*)', r'head/\1')])
  assert list(out) == list(expected)
  for key, leaf in flat.items():
    assert out[key.replace('Dense_1/', 'head/')] is leaf
  assert 'opt_state/0/count/head/kernel' in out
  assert report.actions('opt_state/0/nu/head/bias')[0].describe() == (
      'renamed from opt_state/0/nu/Dense_1/bias')
  assert report.actions('params/Dense_0/kernel') == [hooks.Action('unchanged')]


def test_swap_and_first_rule_wins(flat):
  fn = hooks.build({'name': 'rename', 'rules': [
      ('Conv_0/(.*)', r'Conv_1/\1'), ('Conv_1/(.*)', r'Conv_0/\1'), ('Conv_.*', 'never')]})
  out = fn(flat, api.Context({}, jax.random.key(0), lambda: {}))
  assert sorted(out) == sorted(flat)
  assert out['params/Conv_0/kernel'] is flat['params/Conv_1/kernel']
  assert out['opt_state/0/mu/Conv_1/bias'] is flat['opt_state/0/mu/Conv_0/bias']


def test_frozen_slots_move_too():
  params = helpers.init_params()
  state = helpers.make_state(hooks.freeze(hooks.optim.adam(1e-2), params, ['Conv_.*']))
  flat = flat_lib.flatten(state)
  out, _ = _run(flat, validation.expected_structure(_renamed(flat, 'Dense_0/', 'fc/')),
                rules=[('Dense_0/(.*)', r'fc/\1')])
  key = 'opt_state/inner_states/trainable/inner_state/0/mu/fc/kernel'
  assert out[key] is flat[key.replace('fc/', 'Dense_0/')]


def test_errors(flat):
  fn = hooks.build({'name': 'rename', 'rules': [('Dense_1/(.*)', r'Dense_0/\1')]})
  with pytest.raises(ValueError, match=(
      r"rename: 8 new key\(s\) collide with other keys:\n"
      r"  params/Dense_0/bias <- \['params/Dense_1/bias'\] \(already a key that is not renamed\)")):
    fn(flat, None)
  fn = hooks.build({'name': 'rename', 'rules': [('Dense_0/(.*)', r'x/\1'), ('Dense_1/(.*)', r'x/\1')]})
  with pytest.raises(ValueError, match=(
      r"  params/x/bias <- \['params/Dense_0/bias', 'params/Dense_1/bias'\]\n")):
    fn(flat, None)
  fn = hooks.build({'name': 'rename', 'rules': [('Dense_9/(.*)', r'x/\1')]})
  with pytest.raises(ValueError, match=r"'Dense_9/\(\.\*\)' matches none of the 8 keys"):
    fn(flat, None)
  with pytest.raises(ValueError, match=r"rule 'Dense_1' must be a \(regex, replacement\) pair"):
    hooks.build({'name': 'rename', 'rules': ['Dense_1']})


def test_allow_unmatched(flat):
  fn = hooks.build({'name': 'rename', 'rules': [('Dense_9/(.*)', r'x/\1')],
                    'allow_unmatched': True})
  ctx = api.Context({}, jax.random.key(0), lambda: {})
  out = fn(flat, ctx)
  assert out == flat and out is not flat
