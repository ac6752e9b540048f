"""One test over every registered hook: the hook contract.

Every registered hook needs an entry in EXAMPLES (parameters that make it act
on the tiny CNN); the coverage test fails otherwise.
"""

from __future__ import annotations

import jax
import pytest

import hooks
from hooks import api
from hooks import flat as flat_lib
from hooks import validation
from tests.hooks import helpers

EXAMPLES = {
    'reinit': {'patterns': ['Dense_1/.*']},
    'reset_slots': {'patterns': ['Conv_0/.*', 'Dense_1/bias']},
}


def test_every_registered_hook_has_an_example():
  missing = sorted(set(hooks.names()) - set(EXAMPLES))
  assert not missing, f'Add example parameters to EXAMPLES for {missing}.'


@pytest.fixture(scope='module')
def states():
  state = helpers.jitted_train_step(helpers.make_state(), *helpers.batch())
  fresh = flat_lib.flatten(helpers.make_state(seed=1))
  return flat_lib.flatten(state), fresh


@pytest.mark.parametrize('name', hooks.names())
@pytest.mark.parametrize('abstract', [False, True], ids=['concrete', 'abstract'])
def test_hook_contract(name, abstract, states):
  flat, fresh = states
  if abstract:
    flat, fresh = helpers.abstract(flat), helpers.abstract(fresh)
  expected = validation.expected_structure(flat)
  entry = {'name': name, **EXAMPLES[name]}

  # Called directly, the hook returns a new dict and does not edit its input.
  before = dict(flat)
  ctx = api.Context(expected, jax.random.key(0), lambda: dict(fresh), abstract=abstract)
  direct = hooks.build(entry)(flat, ctx)
  assert direct is not flat
  assert flat.keys() == before.keys() and all(flat[k] is before[k] for k in flat)

  ctx = api.Context(expected, jax.random.key(0), lambda: dict(fresh), abstract=abstract)
  out = hooks.run_hooks(flat, [entry], ctx, validate_each=True)
  validation.check_structure(out, expected)
  if abstract:
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in out.values())

  report = ctx.report
  param_keys = [k for k in flat if k.startswith('params/')]
  assert all(report.actions(k) for k in param_keys)
  for slots in flat_lib.slot_index(out).values():
    assert all(report.actions(k) for k in slots)
  acted = [k for k in report.keys() if report.actions(k) != [api.Action('unchanged')]]
  assert acted, f'The example for {name!r} does nothing; make it act.'
  for key in flat.keys() - set(acted):
    assert out[key] is flat[key], f'{name!r} changed {key!r} without reporting it.'
