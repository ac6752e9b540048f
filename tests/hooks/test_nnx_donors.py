"""Warm starts between Linen and NNX, through every way each side saves.

The BatchNorm net in both APIs (``models.BNNet`` in a ``BNTrainState``;
``nnx_families.BNNet`` with its ``nnx.Optimizer``) has the same flat keys, so
a warm start with ``opt_state='donor', step='donor'`` must copy params, batch
statistics and optimizer slots bit for bit and carry the step by value
(``int32`` <-> ``uint32``), whichever side saved. An ``nnx.state`` checkpoint
(``'orbax-nnx-state'``: ``Conv_0/kernel/value``, no collections) is named by
the target's keys (``hooks.nnx_donor``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from flax import traverse_util

import hooks
from hooks import nnx_state
from tests.hooks import helpers
from tests.hooks import models
from tests.hooks import nnx_families

TX = hooks.optim.adam(1e-3)
RNG = jax.random.key(0)
DONOR = {'name': 'warm_start', 'opt_state': 'donor', 'step': 'donor'}


def _ramp(x, offset: float):
  """``x`` plus a ramp: every leaf distinct from a fresh one, and each other."""
  x = np.asarray(x)
  ramp = np.linspace(offset, offset + 1, x.size).reshape(x.shape)
  return (x + ramp).astype(x.dtype)


def _linen(step: int = 7) -> models.BNTrainState:
  """A Linen BNTrainState, as after training: every buffer distinct."""
  state = models.make_bn_state(TX, seed=3)
  flat = {k: _ramp(v, 0.25 + i) for i, (k, v) in
          enumerate(hooks.flatten(state).items())}
  flat['step'] = np.int32(step)
  return hooks.unflatten(jax.device_put(flat), state)


def _nnx(seed: int = 0, step: int | None = None, offset: float | None = None):
  """``(model, nnx.Optimizer)`` of the NNX BNNet, holding the Linen init's
  variables (one compiled init per process); with ``offset``, every buffer
  made distinct."""
  model = nnx.eval_shape(lambda: nnx_families.BNNet(rngs=nnx.Rngs(0)))
  nnx_state.write(model, hooks.flatten(dict(models.bn_variables(seed))))
  state = (model, nnx.Optimizer(model, TX, wrt=nnx.Param))
  flat = nnx_state.flatten(state)
  if offset is not None:
    flat = {k: _ramp(v, offset + i) for i, (k, v) in enumerate(flat.items())}
  if step is not None:
    flat['step'] = np.uint32(step)
  return nnx_state.write(state, jax.device_put(flat))


def _host(flat):
  return {k: np.asarray(v) for k, v in flat.items()}


def _save_manager(path: str, tree) -> str:
  with ocp.CheckpointManager(path) as manager:
    manager.save(3, args=ocp.args.StandardSave(tree))
  return path


def _save_standard(path: str, tree) -> str:
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, tree)
  return path


def _check_all_copied(got, want, *, step_dtype):
  """Every key bitwise but the step, which keeps its value and the target's
  dtype."""
  assert sorted(got) == sorted(want)
  for key in got:
    if key != 'step':
      np.testing.assert_array_equal(got[key], want[key], strict=True,
                                    err_msg=key)
  assert got['step'] == want['step'] and got['step'].dtype == step_dtype


def test_linen_train_state_warm_starts_an_nnx_model_and_optimizer(tmp_path):
  donor = _linen(step=7)
  path = _save_manager(str(tmp_path / 'linen'), donor)
  model, optimizer = target = _nnx()
  (out_model, out_opt), report = hooks.apply(
      target, [{**DONOR, 'donor': path}], rng=RNG)
  assert out_model is model and out_opt is optimizer  # Updated in place.
  got = _host(nnx_state.flatten(target))
  _check_all_copied(got, _host(hooks.flatten(donor)), step_dtype=np.uint32)
  assert int(optimizer.step[...]) == 7
  assert [a.action for a in report.actions('batch_stats/BatchNorm_0/var')] == [
      'copied']
  assert report.sources[0]['form'] == 'orbax-manager-step'


def test_nnx_state_saved_under_linen_names_warm_starts_a_train_state(tmp_path):
  donor = _nnx(seed=1, step=11, offset=0.5)
  flat = _host(nnx_state.flatten(donor))
  path = _save_manager(str(tmp_path / 'nnx'),
                       traverse_util.unflatten_dict(flat, sep='/'))
  out, _ = hooks.apply(models.make_bn_state(TX), [{**DONOR, 'donor': path}],
                       rng=RNG)
  assert type(out) is models.BNTrainState
  _check_all_copied(_host(hooks.flatten(out)), flat, step_dtype=np.int32)


def test_raw_nnx_state_checkpoint_warm_starts_a_train_state(tmp_path):
  """``{'model': nnx.state(model), 'optimizer': nnx.state(optimizer)}``."""
  model, optimizer = donor = _nnx(seed=1, step=11, offset=0.5)
  path = _save_manager(str(tmp_path / 'nnx'), {
      'model': nnx.state(model), 'optimizer': nnx.state(optimizer)})
  reader = hooks.open_donor(path)
  assert reader.form == 'orbax-nnx-state'
  plan = hooks.plan(models.make_bn_state(TX), [{**DONOR, 'donor': path}],
                    rng=RNG)
  assert plan.sources[0]['keys_read'] == []  # A plan reads nothing.
  assert plan.totals() == {'copied': len(hooks.flatten(models.make_bn_state(
      TX)))}
  assert {'model/Conv_0/kernel/value', 'model/BatchNorm_0/mean/value',
          'optimizer/opt_state/0/mu/Conv_0/kernel/value',
          'optimizer/step/value'} <= set(reader.structure())
  out, report = hooks.apply(models.make_bn_state(TX),
                            [{**DONOR, 'donor': path}], rng=RNG)
  want = _host(nnx_state.flatten(donor))
  _check_all_copied(_host(hooks.flatten(out)), want, step_dtype=np.int32)
  (source,) = report.sources
  assert (source['form'], source['step']) == ('orbax-nnx-state', 3)
  assert source['keys_read'] == sorted(reader.structure())
  action, = report.actions('batch_stats/BatchNorm_0/mean')
  assert (action.action, action.source) == (
      'copied', 'batch_stats/BatchNorm_0/mean')


def test_nnx_model_state_warm_starts_nnx_and_leaves_rng_state_out(tmp_path):
  """``nnx.state(model)`` with RNG state: orbax saves the keys' data; no
  target key reads them, so they are not copied."""
  model, _ = donor = _nnx(seed=1, offset=0.5)
  model.rngs = nnx.Rngs(dropout=1)
  path = _save_standard(str(tmp_path / 'model'), nnx.state(model))
  reader = hooks.open_donor(path)
  assert {'rngs/dropout/key/value', 'rngs/dropout/count/value'} <= set(
      reader.structure())
  target = _nnx()
  fresh_slots = {k: v for k, v in nnx_state.flatten(target).items()
                 if k.startswith('opt_state/') or k == 'step'}
  _, report = hooks.apply(target, [{'name': 'warm_start', 'donor': path}],
                          rng=RNG)
  got = nnx_state.flatten(target)
  for key, value in nnx_state.flatten(donor[0]).items():
    np.testing.assert_array_equal(got[key], value, strict=True, err_msg=key)
  for key, value in fresh_slots.items():
    assert got[key] is value, key
  assert not [k for k in report.sources[0]['keys_read'] if 'rngs' in k]


@pytest.fixture
def deserialized(monkeypatch):
  """Names of the tensors orbax deserializes (``Conv_0.kernel.value``)."""
  return helpers.spy_on_orbax_reads(monkeypatch)


def test_param_state_reads_only_the_selected_tensors(tmp_path, deserialized):
  model, _ = _nnx(seed=1, offset=0.5)
  path = str(tmp_path / 'params')
  ocp.PyTreeCheckpointer().save(path, nnx.state(model, nnx.Param))
  target = models.make_bn_state(TX)
  entry = {'name': 'copy_params', 'donor': path, 'include': ['Conv_0/.*']}
  out, report = hooks.apply(target, [entry], rng=RNG)
  assert sorted(set(deserialized)) == ['Conv_0.bias.value',
                                       'Conv_0.kernel.value']
  assert report.sources[0]['keys_read'] == ['Conv_0/bias/value',
                                            'Conv_0/kernel/value']
  np.testing.assert_array_equal(out.params['Conv_0']['kernel'],
                                model.Conv_0.kernel[...], strict=True)
  assert out.params['head']['kernel'] is target.params['head']['kernel']
  # A Param state has no statistics: the target's are not copied, and said so.
  with pytest.raises(hooks.HookError,
                     match=r'(?s)lacks 2 key.*batch_stats/BatchNorm_0/mean'):
    hooks.apply(target, [{'name': 'warm_start', 'donor': path}], rng=RNG)
  # States saved by collection, as Linen's variables are.
  by_collection = _save_standard(str(tmp_path / 'by_collection'), {
      'params': nnx.state(model, nnx.Param),
      'batch_stats': nnx.state(model, nnx.BatchStat)})
  out, _ = hooks.apply(target, [{'name': 'warm_start', 'donor': by_collection}],
                       rng=RNG)
  got = _host(hooks.flatten(out))
  for key, value in nnx_state.flatten(model).items():
    np.testing.assert_array_equal(got[key], value, strict=True, err_msg=key)


class _Pair(nnx.Module):

  def __init__(self, start: float = 0.0):
    self.w = nnx.Param(jnp.arange(start, start + 3))


def test_a_variable_the_target_reads_into_two_collections_is_an_error(
    tmp_path):
  path = _save_standard(str(tmp_path / 'pair'), nnx.state(_Pair()))
  target = {'params': {'w': jnp.zeros(3)}, 'stats': {'w': jnp.zeros(3)}}
  entry = {'name': 'copy_params', 'donor': path}
  with pytest.raises(hooks.HookError, match=(
      r"stores no collections, and the target reads its variable 'w' into "
      r"\['params/w', 'stats/w'\]: one variable cannot be both")):
    hooks.apply(target, [entry], rng=RNG)
  # Saved by collection, nothing is ambiguous.
  by_collection = _save_standard(str(tmp_path / 'by_collection'), {
      'params': nnx.state(_Pair(1.0)), 'stats': nnx.state(_Pair(5.0))})
  out, _ = hooks.apply(target, [{**entry, 'donor': by_collection}], rng=RNG)
  np.testing.assert_array_equal(out['params']['w'], [1.0, 2.0, 3.0])
  np.testing.assert_array_equal(out['stats']['w'], [5.0, 6.0, 7.0])


def test_a_step_the_target_cannot_hold_is_an_error_not_a_wrap(tmp_path):
  linen = _save_standard(str(tmp_path / 'linen'), _linen(step=-1))
  target = _nnx()
  before = _host(nnx_state.flatten(target))
  with pytest.raises(hooks.HookError, match=(
      r"step: the donor's int32 values -1\.\.-1 do not fit the target's "
      r'uint32 \(0\.\.4294967295\); a copy would wrap them')):
    hooks.apply(target, [{**DONOR, 'donor': linen}], rng=RNG)
  after = _host(nnx_state.flatten(target))
  for key in before:  # Nothing was written.
    np.testing.assert_array_equal(after[key], before[key], strict=True)
  _, optimizer = _nnx(step=2**31)
  big = _save_standard(str(tmp_path / 'nnx'), nnx.state(optimizer))
  entry = {'name': 'copy_step', 'donor': big}
  with pytest.raises(hooks.HookError, match=(
      r"the donor's uint32 values 2147483648\.\.2147483648 do not fit the "
      r"target's int32")):
    hooks.apply(models.make_bn_state(TX), [entry], rng=RNG)
  _, optimizer = _nnx(step=5)
  ok = _save_standard(str(tmp_path / 'ok'), nnx.state(optimizer))
  out, _ = hooks.apply(models.make_bn_state(TX), [{**entry, 'donor': ok}],
                       rng=RNG)
  assert out.step == 5 and out.step.dtype == np.int32


def test_rename_rules_point_at_nnx_donor_paths(tmp_path):
  """A target layer the donor names otherwise takes its collection too."""
  model, _ = _nnx(seed=1, offset=0.5)
  path = _save_standard(str(tmp_path / 'model'), nnx.state(model))
  target = {'params': {'classifier': {'kernel': jnp.zeros((8, 5)),
                                      'bias': jnp.zeros(5)}}}
  entry = {'name': 'copy_params', 'donor': path,
           'rename': [('classifier/(.*)', r'head/\1')]}
  out, report = hooks.apply(target, [entry], rng=RNG)
  for name in ('kernel', 'bias'):
    np.testing.assert_array_equal(out['params']['classifier'][name],
                                  getattr(model.head, name)[...], strict=True)
  assert report.actions('params/classifier/kernel')[0].source == (
      'params/head/kernel')
  assert report.sources[0]['keys_read'] == ['head/bias/value',
                                            'head/kernel/value']


def test_raw_nnx_state_checkpoint_restores_into_nnx_and_linen(tmp_path):
  """``hooks.restore`` names an ``nnx.state`` checkpoint by the target too."""
  model, optimizer = donor = _nnx(seed=1, step=11, offset=0.5)
  path = _save_standard(str(tmp_path / 'nnx'), {
      'model': nnx.state(model), 'optimizer': nnx.state(optimizer)})
  want = _host(nnx_state.flatten(donor))
  target = _nnx()
  out, report = hooks.restore(path, target, rng=RNG)
  assert out is target
  _check_all_copied(_host(nnx_state.flatten(out)), want, step_dtype=np.uint32)
  assert report.sources[0]['form'] == 'orbax-nnx-state'
  linen, _ = hooks.restore(path, models.make_bn_state(TX), rng=RNG)
  _check_all_copied(_host(hooks.flatten(linen)), want, step_dtype=np.int32)


def test_fresh_must_give_what_the_state_is():
  model, _ = _nnx()
  with pytest.raises(hooks.HookError, match=r'fresh\(\) returned \(model, '
                     r'optimizer\), but the state is a model alone'):
    hooks.apply(model, [{'name': 'reinit', 'patterns': ['head/.*']}],
                rng=RNG, fresh=_nnx)


def test_flax_guide_checkpoint_with_rng_state_restores_into_its_model(
    tmp_path):
  """A model with a Dropout's ``Rngs``, saved as the Flax NNX guide saves
  it; restoring it into the same model leaves the target's RNG state (which
  the flat view does not hold) alone, and reads none of the donor's."""
  model, optimizer = donor = _nnx(seed=1, step=5, offset=0.5)
  model.dropout = nnx.Dropout(0.1, rngs=nnx.Rngs(dropout=1))
  path = _save_standard(str(tmp_path / 'nnx'), {
      'model': nnx.state(model), 'optimizer': nnx.state(optimizer)})
  assert 'model/dropout/rngs/key/value' in hooks.open_donor(path).structure()
  target_model, _ = target = _nnx()
  target_model.dropout = nnx.Dropout(0.1, rngs=nnx.Rngs(dropout=7))
  key_before = np.asarray(jax.random.key_data(
      target_model.dropout.rngs.key[...]))
  _, report = hooks.restore(path, target, rng=RNG)
  _check_all_copied(_host(nnx_state.flatten(target)),
                    _host(nnx_state.flatten(donor)), step_dtype=np.uint32)
  np.testing.assert_array_equal(
      jax.random.key_data(target_model.dropout.rngs.key[...]), key_before)
  assert not [k for k in report.sources[0]['keys_read'] if 'rngs' in k]
