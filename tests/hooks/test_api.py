"""Tests for hooks.registry and hooks.report."""

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
  assert hook_fn.__name__ == 'scale'  # Named as its entry, for errors.
  flat = {'params/w': jnp.ones((2, 3)), 'params/b': jnp.zeros((3,))}
  ctx = api.Context(expected=validation.expected_structure(flat), rng=jax.random.key(0))
  out = hook_fn(flat, ctx)
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


# --------------------------------------------------------------------- report


def test_report_table_and_json():
  report = hooks.Report()
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
  report = hooks.Report()
  with pytest.raises(ValueError, match="Unknown report action 'scaled'"):
    report.record('params/w', 'scaled')
  with pytest.raises(ValueError, match="'copied' for 'params/w' needs source="):
    report.record('params/w', 'copied')
  with pytest.raises(ValueError, match='needs from_shape= and shape='):
    report.record('params/w', 'resized', shape=(2,))
