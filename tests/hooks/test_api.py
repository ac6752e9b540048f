"""Tests for hooks.api (Context, Report, run_hooks) and hooks.registry."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hooks
from hooks import api
from hooks import flat as flat_lib
from hooks import registry
from hooks import validation
from tests.hooks import helpers


@pytest.fixture(autouse=True)
def _restore_registry(monkeypatch):
  monkeypatch.setattr(registry, '_REGISTRY', dict(registry._REGISTRY))


def _flat():
  return {'params/w': jnp.ones((2, 3)), 'params/b': jnp.zeros((3,)), 'step': jnp.array(0)}


def _ctx(flat, **kwargs):
  return api.Context(
      expected=validation.expected_structure(flat),
      rng=jax.random.key(0),
      fresh=lambda: {k: jnp.full_like(v, 7) for k, v in flat.items()},
      **kwargs,
  )


def scale(patterns, factor=2.0):
  """A test hook: multiplies params by factor (records nothing special)."""

  def hook_fn(flat, ctx):
    out = dict(flat)
    for key in flat_lib.param_keys(flat, patterns):
      out[key] = api.apply_leaf(lambda x: x * factor, flat[key])
      ctx.report.record(key, 'reinitialized')
    return out

  return hook_fn


def failing(message='boom'):
  def hook_fn(flat, ctx):
    del flat, ctx
    raise RuntimeError(message)

  return hook_fn


# ------------------------------------------------------------------ registry


def test_register_get_build():
  hooks.register('scale')(scale)
  assert hooks.get('scale') is scale
  assert 'scale' in hooks.names() and 'reinit' in hooks.names()
  hook_fn = hooks.build({'name': 'scale', 'patterns': ['w'], 'factor': 3.0})
  flat = _flat()
  out = hook_fn(flat, _ctx(flat))
  np.testing.assert_array_equal(out['params/w'], 3.0)
  assert out['params/b'] is flat['params/b']


def test_register_rejects_a_taken_name_and_bad_names():
  hooks.register('scale')(scale)
  hooks.register('scale')(scale)  # The same factory again is fine.
  with pytest.raises(ValueError, match="'scale' is already registered to .*scale"):
    hooks.register('scale')(failing)
  with pytest.raises(ValueError, match='without ":"'):
    hooks.register('a:b')


def test_unknown_hook_lists_names_with_did_you_mean():
  with pytest.raises(hooks.UnknownHookError) as info:
    hooks.get('reinitt')
  assert isinstance(info.value, KeyError)
  assert str(info.value).startswith("Unknown hook 'reinitt'. Did you mean 'reinit'?")
  assert "'reset_slots'" in str(info.value)


def test_import_path_resolution():
  assert hooks.get('tests.hooks.test_api:scale') is scale
  with pytest.raises(ImportError, match="Cannot import module 'tests.hooks.nope'"):
    hooks.get('tests.hooks.nope:scale')
  with pytest.raises(AttributeError, match=r"has no attribute 'scal'. Did you mean \['scale'\]"):
    hooks.get('tests.hooks.test_api:scal')
  with pytest.raises(ValueError, match='must look like "package.module:function"'):
    hooks.get('tests.hooks.test_api:')


def test_build_parameter_errors():
  hooks.register('scale')(scale)
  with pytest.raises(ValueError, match=r"'scale' got unknown parameter\(s\) \['fator'\]; it accepts \['patterns', 'factor'\]"):
    hooks.build({'name': 'scale', 'patterns': ['w'], 'fator': 2})
  with pytest.raises(ValueError, match=r"missing required parameter\(s\) \['patterns'\]"):
    hooks.build({'name': 'scale'})
  with pytest.raises(ValueError, match='has no "name"'):
    hooks.build({'patterns': ['w']})


# ---------------------------------------------------------------- run_hooks


def test_run_hooks_runs_in_order_and_reports():
  hooks.register('scale')(scale)
  flat = _flat()
  ctx = _ctx(flat)
  out = hooks.run_hooks(
      flat,
      [{'name': 'scale', 'patterns': ['w'], 'factor': 2.0},
       {'name': 'scale', 'patterns': ['w'], 'factor': 5.0}],
      ctx,
  )
  np.testing.assert_array_equal(out['params/w'], 10.0)
  assert out['params/b'] is flat['params/b'] and out['step'] is flat['step']
  np.testing.assert_array_equal(flat['params/w'], 1.0)  # Input untouched.
  assert [a.hook for a in ctx.report.actions('params/w')] == ['scale', 'scale']
  assert ctx.report.actions('params/b') == [api.Action('unchanged')]


def test_a_failing_hook_leaves_the_input_untouched_and_is_named():
  hooks.register('scale')(scale)
  hooks.register('failing')(failing)
  flat = _flat()
  before = dict(flat)
  ctx = _ctx(flat)
  with pytest.raises(api.HookError, match=r"Hook #1 'failing' failed: RuntimeError: boom") as info:
    hooks.run_hooks(flat, [{'name': 'scale', 'patterns': ['w']}, {'name': 'failing'}], ctx)
  assert isinstance(info.value.__cause__, RuntimeError)
  assert (info.value.name, info.value.index) == ('failing', 1)
  assert flat.keys() == before.keys() and all(flat[k] is before[k] for k in flat)
  assert ctx.report.keys() == []  # Nothing is finalized on failure.


def test_bad_entry_fails_before_any_hook_runs():
  calls = []

  def recording(flat, ctx):
    calls.append(1)
    return dict(flat)

  with pytest.raises(hooks.UnknownHookError):
    hooks.run_hooks(_flat(), [recording, {'name': 'nope'}], _ctx(_flat()))
  assert calls == []


def test_run_hooks_validates_after_the_last_hook_only_by_default():
  """Rename then resize: the state differs from the target in between."""
  flat = {'params/old': np.ones((2,), np.float32)}
  expected = {'params/new': jax.ShapeDtypeStruct((4,), jnp.float32)}

  def rename(flat, ctx):
    ctx.report.record('params/new', 'renamed', source='params/old')
    return {'params/new': flat['params/old']}

  def resize(flat, ctx):
    ctx.report.record('params/new', 'resized', from_shape=(2,), shape=(4,))
    return {'params/new': np.concatenate([flat['params/new']] * 2)}

  ctx = api.Context(expected=expected, rng=jax.random.key(0), fresh=dict)
  out = hooks.run_hooks(flat, [rename, resize], ctx)
  assert out['params/new'].shape == (4,)
  assert [a.describe() for a in ctx.report.actions('params/new')] == [
      'renamed from params/old', 'resized (2,) -> (4,)'
  ]
  ctx = api.Context(expected=expected, rng=jax.random.key(0), fresh=dict)
  with pytest.raises(validation.StructureError, match="state after hook #0 'rename'"):
    hooks.run_hooks(flat, [rename, resize], ctx, validate_each=True)
  with pytest.raises(validation.StructureError, match='state after the last hook'):
    hooks.run_hooks(flat, [rename], api.Context(expected, jax.random.key(0), dict))


def test_fresh_is_built_once_and_rngs_differ_per_hook():
  calls, rngs = [], []

  def fresh():
    calls.append(1)
    return {'params/w': jnp.zeros(2)}

  def use(flat, ctx):
    ctx.fresh()['params/w'] = None  # Editing the copy is harmless.
    assert ctx.fresh()['params/w'] is not None
    rngs.append(jax.random.key_data(ctx.rng))
    return dict(flat)

  flat = {'params/w': jnp.ones(2)}
  ctx = api.Context(validation.expected_structure(flat), jax.random.key(0), fresh)
  hooks.run_hooks(flat, [use, use], ctx)
  assert calls == [1]
  assert not np.array_equal(rngs[0], rngs[1])


# --------------------------------------------------------------------- report


def test_report_table_and_json():
  report = api.Report()
  report.record('params/Dense_1/kernel', 'resized', from_shape=(256, 5), shape=(256, 10))
  report.record('params/Dense_0/kernel', 'copied', source='params/Dense_0/kernel')
  report.record('opt_state/0/mu/Dense_1/kernel', 'reset')
  flat = {
      'params/Dense_0/kernel': np.zeros((3, 256)),
      'params/Dense_1/kernel': np.zeros((256, 10)),
      'opt_state/0/mu/Dense_0/kernel': np.zeros((3, 256)),
      'opt_state/0/mu/Dense_1/kernel': np.zeros((256, 10)),
      'step': np.zeros(()),
  }
  report.finalize(flat)
  assert report.table() == '\n'.join([
      'key                            shape      action',
      'opt_state/0/mu/Dense_0/kernel  (3, 256)   unchanged',
      'opt_state/0/mu/Dense_1/kernel  (256, 10)  reset',
      'params/Dense_0/kernel          (3, 256)   copied from donor key params/Dense_0/kernel',
      'params/Dense_1/kernel          (256, 10)  resized (256, 5) -> (256, 10)',
      'totals: copied: 1, resized: 1, reset: 1, unchanged: 1',
  ])
  data = report.to_json()
  assert json.loads(json.dumps(data)) == data
  assert data['keys']['params/Dense_1/kernel'] == {
      'shape': [256, 10],
      'actions': [{'action': 'resized', 'description': 'resized (256, 5) -> (256, 10)',
                   'from_shape': [256, 5], 'shape': [256, 10]}],
  }
  assert data['totals'] == {'copied': 1, 'resized': 1, 'reset': 1, 'unchanged': 1}


def test_report_rejects_bad_actions():
  report = api.Report()
  with pytest.raises(ValueError, match="Unknown report action 'scaled'"):
    report.record('params/w', 'scaled')
  with pytest.raises(ValueError, match="'copied' for 'params/w' needs source="):
    report.record('params/w', 'copied')
  with pytest.raises(ValueError, match='needs from_shape= and shape='):
    report.record('params/w', 'resized', shape=(2,))


def test_builtin_hooks_reinit_and_reset_slots_exact():
  state = helpers.jitted_train_step(helpers.make_state(), *helpers.batch())
  flat = flat_lib.flatten(state)
  fresh = flat_lib.flatten(helpers.make_state(seed=1))
  ctx = api.Context(validation.expected_structure(flat), jax.random.key(0), lambda: fresh)
  out = hooks.run_hooks(
      flat,
      [{'name': 'reinit', 'patterns': ['Dense_1/kernel']},
       {'name': 'reset_slots', 'patterns': ['Conv_0/.*']}],
      ctx,
      validate_each=True,
  )
  assert out['params/Dense_1/kernel'] is fresh['params/Dense_1/kernel']
  assert out['opt_state/0/count/Dense_1/kernel'] is fresh['opt_state/0/count/Dense_1/kernel']
  assert out['params/Conv_0/kernel'] is flat['params/Conv_0/kernel']
  assert out['opt_state/0/nu/Conv_0/bias'] is fresh['opt_state/0/nu/Conv_0/bias']
  assert out['opt_state/0/mu/Dense_1/bias'] is flat['opt_state/0/mu/Dense_1/bias']
  assert ctx.report.totals() == {'reinitialized': 1, 'reset': 9, 'unchanged': 22}
