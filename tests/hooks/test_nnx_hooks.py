"""Built-in hooks on NNX models: ``(model, nnx.Optimizer)`` edited in place.

Values are read back through the model's and the optimizer's own attributes
(``model.head.kernel``, ``opt.opt_state[0].mu['head']['kernel']``), not the
flat view the hooks edit, so a wrong write shows.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from flax import traverse_util

import hooks
from hooks import flat as flat_lib
from hooks import nnx_state
from tests import legacy as legacy_lib
from tests.hooks import families
from tests.hooks import nnx_families

RNG = jax.random.key(0)


def _v(variable: Any) -> np.ndarray:
  """A variable's value, as numpy."""
  return np.asarray(variable[...])


def _adam(opt: nnx.Optimizer, slot: str, layer: str, name: str
          ) -> np.ndarray:
  """Adam slot ``slot`` (mu, nu, count) of param ``layer/name``."""
  return _v(getattr(opt.opt_state[0], slot)[layer][name])


def _snapshot(state: Any) -> dict[str, np.ndarray]:
  return {k: np.array(v) for k, v in nnx_state.flatten(state).items()}


def _save(path: Any, flat: dict[str, Any]) -> str:
  """An orbax StandardCheckpointer save of a flat view, nested by '/'."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, traverse_util.unflatten_dict(flat, sep='/'))
  checkpointer.wait_until_finished()
  return str(path)


def _unchanged_except(state: Any, before: dict[str, np.ndarray],
                      layer: str) -> None:
  """Every leaf not of ``layer`` (its params, stats, slots) is as before."""
  for key, value in nnx_state.flatten(state).items():
    if f'/{layer}/' not in f'/{key}':
      np.testing.assert_array_equal(value, before[key], err_msg=key)


def test_reinit_replaces_a_head_and_its_slots_in_place():
  model, opt = state = nnx_families.BN.used('adam', seed=0, step=3)
  fresh_model, fresh_opt = nnx_families.BN.state('adam', seed=5)
  before = _snapshot(state)

  out, report = hooks.apply(
      state, [{'name': 'reinit', 'patterns': ['head/.*']}], rng=RNG,
      fresh=lambda: (fresh_model, fresh_opt))

  assert out[0] is model and out[1] is opt
  for name in ('kernel', 'bias'):
    want = _v(getattr(fresh_model.head, name))
    np.testing.assert_array_equal(_v(getattr(model.head, name)), want)
    assert not np.array_equal(before[f'params/head/{name}'], want)
    for slot in ('mu', 'nu', 'count'):
      np.testing.assert_array_equal(_adam(opt, slot, 'head', name), 0)
  assert [a.action for a in report.actions('params/head/kernel')] == [
      'reinitialized']
  assert [a.action for a in report.actions('opt_state/0/nu/head/bias')] == [
      'reset']
  _unchanged_except(state, before, 'head')
  assert int(opt.step[...]) == 3


def test_reinit_on_a_model_without_optimizer():
  model = nnx_families.CNN.used('sgd', seed=0, step=3)[0]
  fresh = nnx_families.CNN.state('sgd', seed=5)[0]
  before = _snapshot(model)

  out, _ = hooks.apply(model, [{'name': 'reinit', 'patterns': ['Dense_1/.*']}],
                       rng=RNG, fresh=lambda: fresh)

  assert out is model
  assert sorted(before) == sorted(f'params/{layer}/{name}'
                                  for layer in nnx_families.CNN.layers
                                  for name in ('bias', 'kernel'))
  np.testing.assert_array_equal(_v(model.Dense_1.kernel),
                                _v(fresh.Dense_1.kernel))
  _unchanged_except(model, before, 'Dense_1')


@pytest.mark.parametrize('opt_name, slots', [('adam', ('mu', 'nu', 'count')),
                                             ('sgd', ('trace',))])
def test_reset_slots_keeps_the_params(opt_name, slots):
  model, opt = state = nnx_families.CNN.used(opt_name, seed=0, step=3)
  before = _snapshot(state)

  hooks.apply(state, [{'name': 'reset_slots', 'patterns': ['Conv_0/.*']}],
              rng=RNG, fresh=lambda: nnx_families.CNN.state(opt_name, seed=1))

  for slot in slots:
    for name in ('kernel', 'bias'):
      value = _v(getattr(opt.opt_state[0], slot)['Conv_0'][name])
      shape = _v(getattr(model.Conv_0, name)).shape
      assert value.shape == ((1,) * len(shape) if slot == 'count' else shape)
      np.testing.assert_array_equal(value, 0)
      key = f'opt_state/0/{slot}/Conv_0/{name}'
      assert np.any(before[key] != 0), key  # It was reset, not kept.
  for key, value in nnx_state.flatten(state).items():
    if not key.startswith('opt_state/0/') or '/Conv_0/' not in key:
      np.testing.assert_array_equal(value, before[key], err_msg=key)


def test_rename_restores_params_batch_stats_and_slots(tmp_path):
  donor = _snapshot(nnx_families.BN.used('adam', seed=2, step=7))
  renamed = {k.replace('/BatchNorm_0/', '/norm/'): v for k, v in donor.items()}
  path = _save(tmp_path / 'renamed', renamed)
  model, opt = state = nnx_families.BN.state('adam', seed=1)

  out, report = hooks.restore(
      path, state, [{'name': 'rename', 'rules': [('norm/(.*)',
                                                 r'BatchNorm_0/\1')]}],
      rng=RNG)

  assert out[0] is model and out[1] is opt
  norm = model.BatchNorm_0
  for name, key in (('mean', 'batch_stats/norm/mean'),
                    ('var', 'batch_stats/norm/var'),
                    ('scale', 'params/norm/scale')):
    np.testing.assert_array_equal(_v(getattr(norm, name)), renamed[key])
  np.testing.assert_array_equal(_adam(opt, 'nu', 'BatchNorm_0', 'bias'),
                                renamed['opt_state/0/nu/norm/bias'])
  assert report.actions('batch_stats/BatchNorm_0/var')[0].source == (
      'batch_stats/norm/var')
  after = nnx_state.flatten(state)
  assert after.keys() == donor.keys()
  for key, value in after.items():  # Every leaf is the donor's.
    np.testing.assert_array_equal(value, donor[key], err_msg=key)
  assert opt.step[...].dtype == np.uint32 and int(opt.step[...]) == 7


def test_resize_head_moves_columns_and_their_slots(tmp_path):
  # A 4-class NNX run whose columns are classes d, a, b, c.
  donor = _snapshot(nnx_families.BN.used('adam', seed=2, step=7, outputs=4))
  path = _save(tmp_path / 'four', donor)
  fresh = nnx_families.BN.state('adam', seed=9)
  model, opt = state = nnx_families.BN.state('adam', seed=1)

  hooks.restore(path, state, [{'name': 'resize_head', 'layer': 'head',
                               'from_classes': list('dabc'),
                               'to_classes': list('abcde')}],
                rng=RNG, fresh=lambda: fresh)

  source = [1, 2, 3, 0]  # Donor column of a, b, c, d; e is new.
  fresh_flat = nnx_state.flatten(fresh)
  for name in ('kernel', 'bias'):
    got = {'params': _v(getattr(model.head, name)),
           **{s: _adam(opt, s, 'head', name) for s in ('mu', 'nu', 'count')}}
    shapes = (got['params'].shape, donor[f'params/head/{name}'].shape)
    for part, value in got.items():
      key = (f'params/head/{name}' if part == 'params'
             else f'opt_state/0/{part}/head/{name}')
      assert value.shape[-1] == 5, key  # A count grows along the classes.
      value = np.broadcast_to(value, shapes[0])
      np.testing.assert_array_equal(
          value[..., :4], np.broadcast_to(donor[key], shapes[1])[..., source],
          err_msg=key)
      np.testing.assert_array_equal(value[..., 4], np.broadcast_to(
          fresh_flat[key], shapes[0])[..., 4], err_msg=key)
  np.testing.assert_array_equal(_adam(opt, 'count', 'head', 'kernel'),
                                [[7, 7, 7, 7, 0]])  # New class: Adam's first.
  np.testing.assert_array_equal(_v(model.Dense_0.kernel),
                                donor['params/Dense_0/kernel'])


def test_map_labels_moves_embedding_rows_and_their_adam_slots():
  vocab = [f'tok{i}' for i in range(50)]
  new = vocab[::-1]
  new[4:6] = ['X', 'Y']  # tok45 and tok44 dropped; X and Y new.
  model, opt = state = nnx_families.TRANSFORMER.used('adam', seed=0, step=3)
  fresh = nnx_families.TRANSFORMER.state('adam', seed=4)
  before = _snapshot(state)

  _, report = hooks.apply(
      state, [{'name': 'map_labels', 'layers': 'Embed_0', 'axis': 0,
               'from_labels': vocab, 'to_labels': new}],
      rng=RNG, fresh=lambda: fresh)

  rows = [vocab.index(t) if t in vocab else None for t in new]
  fresh_flat = nnx_state.flatten(fresh)
  got = {'params/Embed_0/embedding': _v(model.Embed_0.embedding),
         **{f'opt_state/0/{s}/Embed_0/embedding':
            _adam(opt, s, 'Embed_0', 'embedding')
            for s in ('mu', 'nu', 'count')}}
  shape = got['params/Embed_0/embedding'].shape
  assert got['opt_state/0/count/Embed_0/embedding'].shape == (len(new), 1)
  for key, value in got.items():
    value = np.broadcast_to(value, shape)
    wanted = np.broadcast_to(fresh_flat[key], shape), np.broadcast_to(
        before[key], (len(vocab), shape[1]))
    for j, i in enumerate(rows):
      want = wanted[0][j] if i is None else wanted[1][i]
      np.testing.assert_array_equal(value[j], want, err_msg=f'{key} row {j}')
  assert np.all(got['opt_state/0/count/Embed_0/embedding'][[4, 5]] == 0)
  assert np.all(got['opt_state/0/count/Embed_0/embedding'][[0, 1]] == 3)
  assert report.actions('params/Embed_0/embedding')[0].action == 'relabelled'
  _unchanged_except(state, before, 'Embed_0')


def test_warm_start_between_linen_and_nnx_is_bitwise(tmp_path):
  """Linen -> NNX and NNX -> Linen: params, stats, slots; step by value."""
  linen = families.BN.used('adam', seed=2, step=7)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / 'linen', linen)
  checkpointer.wait_until_finished()
  entry = {'name': 'warm_start', 'opt_state': 'donor', 'step': 'donor'}

  model, opt = state = nnx_families.BN.state('adam', seed=1)
  hooks.apply(state, [{**entry, 'donor': str(tmp_path / 'linen')}], rng=RNG)
  want = flat_lib.flatten(linen)
  got = nnx_state.flatten(state)
  assert got.keys() == want.keys()
  for key in got:
    if key != 'step':
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert opt.step[...].dtype == np.uint32 and int(opt.step[...]) == 7
  np.testing.assert_array_equal(_v(model.BatchNorm_0.mean),
                                want['batch_stats/BatchNorm_0/mean'])

  nnx_donor = _snapshot(nnx_families.BN.used('adam', seed=3, step=11))
  path = _save(tmp_path / 'nnx', nnx_donor)
  back, _ = hooks.apply(families.BN.state('adam', seed=1),
                        [{**entry, 'donor': path}], rng=RNG)
  got = flat_lib.flatten(back)
  for key in got:
    if key != 'step':
      np.testing.assert_array_equal(got[key], nnx_donor[key], err_msg=key)
  assert back.step == 11


def test_dry_runs_leave_the_live_model_and_optimizer_bit_identical(tmp_path):
  model, opt = state = nnx_families.BN.used('adam', seed=0, step=3)
  donor = _snapshot(nnx_families.BN.used('adam', seed=2, step=7))
  path = _save(tmp_path / 'donor', donor)
  live = nnx_state.flatten(state)
  values = _snapshot(state)
  entries = [{'name': 'warm_start', 'donor': path, 'opt_state': 'donor',
              'step': 'donor'},
             {'name': 'reinit', 'patterns': ['head/.*']},
             {'name': 'map_labels', 'layers': 'head',
              'from_labels': list('abcde'), 'to_labels': list('edcba')}]
  fresh = lambda: nnx_families.BN.state('adam', seed=5)

  planned, report = hooks.apply(state, entries, rng=RNG, fresh=fresh,
                                dry_run=True)
  report_plan = hooks.plan(state, entries, rng=RNG, fresh=fresh)
  restored, _ = hooks.restore(path, state, [], rng=RNG, dry_run=True)

  for out in (planned, restored):
    assert out[0] is not model and out[1] is not opt
    assert all(isinstance(v, jax.ShapeDtypeStruct)
               for v in nnx_state.flatten(out).values())
  assert report.table() == report_plan.table()
  assert not any(s.get('keys_read') for s in report.sources)
  after = nnx_state.flatten(state)
  assert after.keys() == live.keys()
  for key, value in after.items():
    assert value is live[key], key
    np.testing.assert_array_equal(value, values[key], err_msg=key)
    assert np.asarray(value).dtype == values[key].dtype


class SeedCNN(nnx.Module):
  """The seed document's CNN in NNX, with its final log_softmax."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.Conv_0 = nnx.Conv(1, 32, (3, 3), rngs=rngs)
    self.Conv_1 = nnx.Conv(32, 64, (3, 3), rngs=rngs)
    self.Dense_0 = nnx.Linear(7 * 7 * 64, 256, rngs=rngs)
    self.Dense_1 = nnx.Linear(256, 10, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    pool = lambda y: nnx.avg_pool(y, (2, 2), strides=(2, 2))
    x = pool(nnx.relu(self.Conv_0(x)))
    x = pool(nnx.relu(self.Conv_1(x)))
    x = nnx.relu(self.Dense_0(x.reshape((x.shape[0], -1))))
    return nnx.log_softmax(self.Dense_1(x))


@nnx.jit
def _step(model: SeedCNN, opt: nnx.Optimizer, images: jax.Array,
          labels: jax.Array) -> None:
  def nll(model):
    logp = model(images)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))
  opt.update(model, nnx.grad(nll)(model))


def test_migrate_flax_optim_into_an_nnx_optimizer_reproduces_the_next_step():
  legacy_lib.require()
  checkpoint = legacy_lib.CHECKPOINT
  legacy = flat_lib.flatten_raw(legacy_lib.read(checkpoint))
  reference = legacy_lib.reference()
  # optimizer.json: flax.optim.Adam(1e-3, 0.9, 0.999, 1e-8) is optax.adam.
  tx = optax.adam(1e-3, b1=0.9, b2=0.999, eps=1e-8)

  def create():
    model = SeedCNN(rngs=nnx.Rngs(0))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  # Restored into an abstract model, as NNX users restore: nothing is
  # initialised that the checkpoint replaces.
  model, opt = abstract = nnx.eval_shape(create)
  restored, _ = hooks.restore(checkpoint, abstract,
                              [{'name': 'migrate_flax_optim'}], rng=RNG)

  assert restored[0] is model and restored[1] is opt
  assert all(isinstance(v, jax.Array)
             for v in nnx_state.flatten(abstract).values())

  assert opt.step[...].dtype == np.uint32 and int(opt.step[...]) == 20
  assert int(opt.opt_state[0].count[...]) == 20
  np.testing.assert_array_equal(_v(model.Dense_1.kernel),
                                legacy['target/Dense_1/kernel'])
  np.testing.assert_array_equal(
      _adam(opt, 'mu', 'Conv_0', 'kernel'),
      legacy['state/param_states/Conv_0/kernel/grad_ema'])
  np.testing.assert_array_equal(
      _adam(opt, 'nu', 'Dense_0', 'bias'),
      legacy['state/param_states/Dense_0/bias/grad_sq_ema'])

  batch = reference['batch']
  _step(model, opt, jnp.asarray(batch['image']), jnp.asarray(batch['label']))
  legacy_lib.assert_next_step(
      {k.partition('/')[2]: v for k, v in nnx_state.flatten(model).items()})
  assert int(opt.step[...]) == 21
