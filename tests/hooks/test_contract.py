"""One test over every registered hook: the hook contract.

Every registered hook needs an entry in EXAMPLES (parameters that make it act
on the tiny CNN); the coverage test fails otherwise. A hook that reads another
layout (pre_restore hooks) also has an entry in INPUTS, which turns the tiny
CNN's state into that layout; the result must still be the tiny CNN's state.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import hooks
from hooks import api
from hooks import flat as flat_lib
from hooks import validation
from tests.hooks import checkpoints
from tests.hooks import helpers

DONOR = '<donor checkpoint>'  # Replaced by the `donor` fixture's path.

EXAMPLES = {
    'migrate_flax_optim': {},
    'reinit': {'patterns': ['Dense_1/.*']},
    'rename': {'rules': [('head/(.*)', r'Dense_1/\1')]},
    'reset_slots': {'patterns': ['Conv_0/.*', 'Dense_1/bias']},
    'resize_head': {'from_classes': [3, 0, 1, 2]},
    'warm_start': {'donor': DONOR, 'exclude': ['Conv_1/.*'], 'opt_state': 'donor'},
}


def _to_legacy_flax_optim(flat):
  """The layout flax.optim.Adam wrote: target/, state/step, state/param_states/."""
  legacy = {'state/step': flat['step']}
  for key, leaf in flat.items():
    if key.startswith('params/'):
      path = key[len('params/'):]
      legacy['target/' + path] = leaf
      legacy[f'state/param_states/{path}/grad_ema'] = flat[f'opt_state/0/mu/{path}']
      legacy[f'state/param_states/{path}/grad_sq_ema'] = flat[f'opt_state/0/nu/{path}']
  return legacy


def _rename_head(flat):
  return {k.replace('/Dense_1/', '/head/'): v for k, v in flat.items()}


def _four_class_head(flat):
  """The head of a four-class run: the last row dropped."""
  out = dict(flat)
  for key, leaf in flat.items():
    if '/Dense_1/' in key:
      shape = tuple(leaf.shape[:-1]) + (leaf.shape[-1] - 1,)
      out[key] = api.apply_leaf(lambda x, s=shape: x[..., : s[-1]], leaf)
  return out


INPUTS = {
    'migrate_flax_optim': _to_legacy_flax_optim,
    'rename': _rename_head,
    'resize_head': _four_class_head,
}


def test_every_registered_hook_has_an_example():
  missing = sorted(set(hooks.names()) - set(EXAMPLES))
  assert not missing, f'Add example parameters to EXAMPLES for {missing}.'


@pytest.fixture(scope='module')
def states():
  state = helpers.jitted_train_step(helpers.make_state(), *helpers.batch())
  fresh = flat_lib.flatten(helpers.make_state(seed=1))
  return flat_lib.flatten(state), fresh


@pytest.fixture(scope='module')
def donor(tmp_path_factory):
  """A five-class donor run (digits 0-4) with other values than the states."""
  state = helpers.jitted_train_step(helpers.make_state(seed=2), *helpers.batch(1))
  return checkpoints.save_orbax(str(tmp_path_factory.mktemp('donor')), state)


@pytest.mark.parametrize('name', hooks.names())
@pytest.mark.parametrize('abstract', [False, True], ids=['concrete', 'abstract'])
def test_hook_contract(name, abstract, states, donor):
  state, fresh = states
  if abstract:
    state, fresh = helpers.abstract(state), helpers.abstract(fresh)
  expected = validation.expected_structure(state)
  flat = INPUTS.get(name, dict)(state)
  params = {k: donor if v == DONOR else v for k, v in EXAMPLES[name].items()}
  entry = {'name': name, **params}

  def context():
    return api.Context(expected, jax.random.key(0), lambda: dict(fresh),
                       classes=(0, 1, 2, 3, 4), abstract=abstract)

  # Called directly, the hook returns a new dict and does not edit its input.
  before = dict(flat)
  direct = hooks.build(entry)(flat, context())
  assert direct is not flat
  assert flat.keys() == before.keys() and all(flat[k] is before[k] for k in flat)

  ctx = context()
  out = hooks.run_hooks(flat, [entry], ctx, validate_each=name not in INPUTS)
  validation.check_structure(out, expected)
  if abstract:
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in out.values())
  else:
    assert not any(isinstance(v, jax.ShapeDtypeStruct) for v in out.values())

  report = ctx.report
  param_keys = [k for k in out if k.startswith('params/')]
  assert all(report.actions(k) for k in param_keys)
  for slots in flat_lib.slot_index(out).values():
    assert all(report.actions(k) for k in slots)
  acted = [k for k in report.keys() if report.actions(k) != [api.Action('unchanged')]]
  assert acted, f'The example for {name!r} does nothing; make it act.'
  for key in (flat.keys() & out.keys()) - set(acted):
    assert out[key] is flat[key], f'{name!r} changed {key!r} without reporting it.'
  for key in acted:  # What a hook reports is in the result, with its shape.
    assert key in out, f'{name!r} reported {key!r}, which is not in its result.'
  if not abstract and name in ('warm_start', 'reinit'):
    assert not np.array_equal(out['params/Dense_1/kernel'], flat['params/Dense_1/kernel'])
