"""Tests for hooks.apply / hooks.restore / hooks.plan: the one pipeline."""

from __future__ import annotations

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hooks
from hooks import flat as flat_lib
from hooks import registry
from tests.hooks import helpers
from tests.hooks.test_api import failing
from tests.hooks.test_api import scale


@pytest.fixture(autouse=True)
def _restore_registry(monkeypatch):
  monkeypatch.setattr(registry, '_REGISTRY', dict(registry._REGISTRY))


def _state():
  return {'params': {'w': jnp.ones((2, 3)), 'b': jnp.zeros((3,))},
          'step': jnp.array(0)}


def test_apply_runs_in_order_reports_and_keeps_untouched_leaves():
  hooks.register('scale')(scale)
  state = _state()
  out, report = hooks.apply(
      state,
      [{'name': 'scale', 'patterns': ['w'], 'factor': 2.0},
       {'name': 'scale', 'patterns': ['w'], 'factor': 5.0}],
      rng=jax.random.key(0))
  np.testing.assert_array_equal(out['params']['w'], 10.0)
  assert out['params']['b'] is state['params']['b'] and out['step'] is state['step']
  np.testing.assert_array_equal(state['params']['w'], 1.0)  # Input untouched.
  assert [a.hook for a in report.actions('params/w')] == ['scale', 'scale']
  assert report.actions('params/b') == [hooks.Action('unchanged')]


def test_a_failing_hook_is_named_and_nothing_is_reported():
  hooks.register('scale')(scale)
  hooks.register('failing')(failing)
  with pytest.raises(hooks.HookError,
                     match=r"Hook #1 'failing' failed: RuntimeError: boom") as info:
    hooks.apply(_state(), [{'name': 'scale', 'patterns': ['w']}, {'name': 'failing'}],
                rng=jax.random.key(0))
  assert isinstance(info.value.__cause__, RuntimeError)
  assert (info.value.name, info.value.index) == ('failing', 1)


def test_bad_entry_fails_before_any_hook_runs():
  calls = []

  def recording(flat, ctx):
    del ctx
    calls.append(1)
    return dict(flat)

  with pytest.raises(hooks.UnknownHookError):
    hooks.apply(_state(), [recording, {'name': 'nope'}], rng=jax.random.key(0))
  assert calls == []
  with pytest.raises(ValueError, match='must be a list'):
    hooks.apply(_state(), {'name': 'reinit'}, rng=jax.random.key(0))


def test_apply_checks_the_structure_after_each_hook():
  def grow(flat, ctx):
    del ctx
    return {**flat, 'params/w': np.ones((4, 3), np.float32)}

  with pytest.raises(hooks.StructureError, match=r"state after hook #0 'grow'"):
    hooks.apply(_state(), [grow], rng=jax.random.key(0))


def test_the_garbage_collector_is_paused_during_surgery_and_restored():
  seen = []

  def record(flat, ctx):
    del ctx
    seen.append(gc.isenabled())
    return dict(flat)

  def boom(flat, ctx):
    del flat, ctx
    raise RuntimeError('boom')

  assert gc.isenabled()
  hooks.apply(_state(), [record], rng=jax.random.key(0))
  hooks.run_flat(flat_lib.flatten(_state()), [record], rng=jax.random.key(0),
                 expected=hooks.expected_structure(flat_lib.flatten(_state())))
  assert seen == [False, False] and gc.isenabled()
  with pytest.raises(hooks.HookError, match='boom'):
    hooks.apply(_state(), [boom], rng=jax.random.key(0))
  assert gc.isenabled()
  gc.disable()  # The caller's choice stands.
  try:
    hooks.apply(_state(), [record], rng=jax.random.key(0))
    assert not gc.isenabled()
  finally:
    gc.enable()


def test_fresh_is_built_once_rngs_differ_and_a_missing_fresh_is_explained():
  calls, rngs = [], []

  def fresh():
    calls.append(1)
    return {'params': {'w': jnp.zeros((2, 3)), 'b': jnp.zeros((3,))},
            'step': jnp.array(0)}

  def use(flat, ctx):
    ctx.fresh()['params/w'] = None  # Editing the copy is harmless.
    assert ctx.fresh()['params/w'] is not None
    rngs.append(jax.random.key_data(ctx.rng))
    return dict(flat)

  hooks.apply(_state(), [use, use], rng=jax.random.key(0), fresh=fresh)
  assert calls == [1]
  assert not np.array_equal(rngs[0], rngs[1])
  with pytest.raises(hooks.HookError, match=r'pass fresh=lambda: create_state\(rng\)'):
    hooks.apply(_state(), [{'name': 'reinit', 'patterns': ['w']}], rng=jax.random.key(0))


def test_dry_run_allocates_nothing_and_matches_the_real_report():
  state = helpers.jitted_train_step(helpers.make_state(), *helpers.batch())
  entries = [{'name': 'reinit', 'patterns': ['Dense_1/kernel']},
             {'name': 'reset_slots', 'patterns': ['Conv_0/.*']}]
  fresh = lambda: helpers.make_state(seed=1)
  out, report = hooks.apply(state, entries, rng=jax.random.key(0), fresh=fresh)
  plan = hooks.plan(state, entries, rng=jax.random.key(0), fresh=fresh)
  abstract, dry = hooks.apply(helpers.abstract(state), entries,
                              rng=jax.random.key(0), fresh=fresh)
  assert plan.to_json() == report.to_json() == dry.to_json()
  assert all(isinstance(v, jax.ShapeDtypeStruct) for v in jax.tree.leaves(abstract))
  new = flat_lib.flatten(out)
  old = flat_lib.flatten(state)
  fresh_flat = flat_lib.flatten(fresh())
  np.testing.assert_array_equal(new['params/Dense_1/kernel'], fresh_flat['params/Dense_1/kernel'])
  np.testing.assert_array_equal(new['opt_state/0/count/Dense_1/kernel'], 0)
  assert new['params/Conv_0/kernel'] is old['params/Conv_0/kernel']
  np.testing.assert_array_equal(new['opt_state/0/nu/Conv_0/bias'], 0)
  assert new['opt_state/0/mu/Dense_1/bias'] is old['opt_state/0/mu/Dense_1/bias']
  assert report.totals() == {'reinitialized': 1, 'reset': 9, 'unchanged': 22}
  assert isinstance(out, type(state)) and out.tx is state.tx


def test_new_leaves_are_placed_like_the_leaves_they_replace():
  state = helpers.make_state()
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def to_host(flat, ctx):
    del ctx
    return {**flat, 'params/Dense_1/bias': np.full((5,), 3.0, np.float32)}

  out, _ = hooks.apply(state, [to_host], rng=jax.random.key(0))
  assert isinstance(out.params['Dense_1']['bias'], jax.Array)
  assert out.params['Dense_1']['bias'].sharding == sharding


def test_restore_reads_checks_places_and_reports_the_source():
  state = helpers.make_state()
  flat = flat_lib.flatten(state)
  renamed = {k.replace('Dense_1', 'head'): v for k, v in flat.items()}
  reader = helpers.MemoryReader(renamed)
  target = helpers.abstract(state)
  out, report = hooks.restore(
      reader, target, [{'name': 'rename', 'rules': [('head/(.*)', r'Dense_1/\1')]}],
      rng=jax.random.key(0))
  got = flat_lib.flatten(out)
  for key, leaf in flat.items():
    np.testing.assert_array_equal(got[key], leaf)
    assert isinstance(got[key], jax.Array)
  assert report.sources == [reader.provenance()]
  assert [sorted(keys) for keys in reader.reads] == [sorted(renamed)]

  reader.reads.clear()
  hooks.restore(reader, target, [{'name': 'rename', 'rules': [('head/(.*)', r'Dense_1/\1')]}],
                rng=jax.random.key(0), dry_run=True)
  assert reader.reads == []  # A dry run reads nothing.

  with pytest.raises(hooks.StructureError, match='state after the last hook') as info:
    hooks.restore(reader, target, rng=jax.random.key(0))
  assert 'params/Dense_1/kernel' in info.value.missing
  assert 'params/head/kernel' in info.value.unexpected


def test_sources_open_each_path_once(tmp_path, monkeypatch):
  opened = []
  monkeypatch.setattr(
      'hooks.donors.open_donor',
      lambda path, item=None, step=None: opened.append(path) or helpers.MemoryReader({}))
  sources = hooks.Sources()
  first = sources.open(tmp_path / 'a')
  assert sources.open(str(tmp_path / 'a')) is first
  sources.open(tmp_path / 'b')
  assert opened == [str(tmp_path / 'a'), str(tmp_path / 'b')]
  assert sources.readers() == [first, sources.open(tmp_path / 'b')]
