"""Every donor form a Flax user saves warm-starts the BatchNorm net.

Each test saves a five-class donor exactly the way a user would, then a
ten-class ``BNNet`` warm-starts from it through ``hooks.apply`` with the head
mapped by label. Checked each time: params and batch statistics copied
bitwise, the head's columns placed by label (the others keep the fresh
value), and every optimizer slot shaped like its param (with the donor's
slots moved like the params where the form has them).
"""

from __future__ import annotations

import os

import flax
import flax.serialization
from flax import nnx
from flax.training import checkpoints as flax_checkpoints
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import hooks
from hooks import nnx_state
from tests.hooks import checkpoints
from tests.hooks import models
from tests.hooks import nnx_families

DONOR_CLASSES = [0, 1, 2, 3, 4]
TARGET_CLASSES = list(range(10))
LABELS = [{'layers': 'head', 'axis': -1, 'donor': DONOR_CLASSES,
           'target': TARGET_CLASSES}]


def _tx():
  return hooks.optim.adam(1e-3)


@pytest.fixture(scope='module')
def donor():
  """A five-class state whose every leaf differs from a fresh one."""
  state = models.make_bn_state(_tx(), seed=3, num_classes=5)
  leaves, treedef = jax.tree.flatten(state)
  leaves = [np.asarray(x) + np.asarray(i + 1, np.asarray(x).dtype)
            for i, x in enumerate(leaves)]
  return jax.tree.unflatten(treedef, leaves)


@pytest.fixture(scope='module')
def target():
  return models.make_bn_state(_tx(), seed=0, num_classes=10)


def _save_manager_default(path, state):
  with ocp.CheckpointManager(path) as manager:
    manager.save(7, args=ocp.args.StandardSave(state))
  return path, {}


def _save_manager_named(path, state):
  with ocp.CheckpointManager(path) as manager:
    manager.save(7, args=ocp.args.Composite(
        model=ocp.args.StandardSave(state),
        notes=ocp.args.JsonSave({'classes': DONOR_CLASSES})))
  return path, {}


def _save_manager_two_tensor_items(path, state):
  with ocp.CheckpointManager(path) as manager:
    manager.save(7, args=ocp.args.Composite(
        model=ocp.args.StandardSave(state),
        ema=ocp.args.StandardSave(state.params)))
  return path, {'item': 'model'}


def _save_standard_checkpointer(path, state):
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, state)
  return path, {}


def _save_pytree_checkpointer(path, state):
  ocp.PyTreeCheckpointer().save(path, state)
  return path, {}


def _save_flax_orbax(path, state):
  flax_checkpoints.save_checkpoint(path, state, step=7)
  return path, {}


def _save_flax_msgpack(path, state):
  with flax.config.temp_flip_flag('use_orbax_checkpointing', False):
    flax_checkpoints.save_checkpoint(path, state, step=7)
  return path, {}


def _save_train_state_msgpack(path, state):
  with open(path, 'wb') as f:
    f.write(flax.serialization.to_bytes(state))
  return path, {}


def _save_variables_msgpack(path, state):
  """``{'params', 'batch_stats'}``: what ``model.init`` returns, saved."""
  with open(path, 'wb') as f:
    f.write(flax.serialization.to_bytes(
        {'params': state.params, 'batch_stats': state.batch_stats}))
  return path, {}


def _save_trainer_workdir(path, state):
  return checkpoints.save_orbax(path, state), {}


def _nnx_of(state):
  """The donor written in NNX: ``nnx_families.BNNet`` and its optimizer."""
  model = nnx_families.BNNet(5, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
  flat = dict(hooks.flatten(state))
  flat['step'] = np.uint32(flat['step'])
  nnx_state.write((model, optimizer), flat)
  return model, optimizer


def _save_nnx_model_state(path, state):
  """``nnx.state(model)`` with a StandardCheckpointer (Flax's NNX guide)."""
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, nnx.state(_nnx_of(state)[0]))
  return path, {}


def _save_nnx_pure_dict(path, state):
  """``nnx.state(model).to_pure_dict()`` (the guide's plain-dict form)."""
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, nnx.state(_nnx_of(state)[0]).to_pure_dict())
  return path, {}


def _save_nnx_model_and_optimizer(path, state):
  """``{'model': nnx.state(model), 'optimizer': nnx.state(optimizer)}``."""
  model, optimizer = _nnx_of(state)
  with ocp.CheckpointManager(path) as manager:
    manager.save(7, args=ocp.args.StandardSave(
        {'model': nnx.state(model), 'optimizer': nnx.state(optimizer)}))
  return path, {}


def _save_nnx_composite(path, state):
  """Model and optimizer as two CheckpointManager items; ``item=`` picks."""
  model, optimizer = _nnx_of(state)
  with ocp.CheckpointManager(path) as manager:
    manager.save(7, args=ocp.args.Composite(
        model=ocp.args.StandardSave(nnx.state(model)),
        optimizer=ocp.args.StandardSave(nnx.state(optimizer))))
  return path, {'item': 'model'}


# Form -> (saver, whether the form carries optimizer slots).
FORMS = {
    'CheckpointManager StandardSave default item': (_save_manager_default, True),
    'CheckpointManager named item beside JSON': (_save_manager_named, True),
    'CheckpointManager item= picks one of two': (
        _save_manager_two_tensor_items, True),
    'StandardCheckpointer directory': (_save_standard_checkpointer, True),
    'PyTreeCheckpointer directory': (_save_pytree_checkpointer, True),
    'flax save_checkpoint (orbax)': (_save_flax_orbax, True),
    'flax save_checkpoint (msgpack)': (_save_flax_msgpack, True),
    'TrainState msgpack': (_save_train_state_msgpack, True),
    'variables msgpack': (_save_variables_msgpack, False),
    'this trainer\'s workdir': (_save_trainer_workdir, True),
    'NNX nnx.state(model), StandardCheckpointer': (_save_nnx_model_state,
                                                   False),
    'NNX to_pure_dict()': (_save_nnx_pure_dict, False),
    'NNX model and optimizer states, CheckpointManager': (
        _save_nnx_model_and_optimizer, True),
    'NNX Composite(model=, optimizer=), item=model': (_save_nnx_composite,
                                                       False),
}


def _check_warm_start(out, report, donor, target, *, slots_from_donor):
  got, old, fresh = (hooks.flatten(s) for s in (out, donor, target))
  for key, leaf in got.items():
    if key.startswith(('params/', 'batch_stats/')):
      if '/head/' in key:  # Columns 0-4 by label; 5-9 keep the fresh value.
        np.testing.assert_array_equal(leaf[..., :5], old[key], strict=True)
        np.testing.assert_array_equal(leaf[..., 5:], fresh[key][..., 5:],
                                      strict=True)
      else:
        np.testing.assert_array_equal(leaf, old[key], strict=True)
  for param, slots in hooks.slot_index(got).items():
    assert slots, param
    for slot in slots:
      if '/count/' in slot:  # One per tensor; a head's grows along the classes.
        shape = (1,) * (got[param].ndim - 1) + (
            10 if slots_from_donor and '/head/' in slot else 1,)
        assert got[slot].shape == shape, slot
      else:
        assert got[slot].shape == got[param].shape, slot
      if slots_from_donor and '/head/' in slot:
        np.testing.assert_array_equal(
            got[slot][..., :5],
            np.broadcast_to(old[slot], got[slot][..., :5].shape), strict=True)
        np.testing.assert_array_equal(got[slot][..., 5:],
                                      np.zeros_like(got[slot][..., 5:]),
                                      strict=True)
      elif slots_from_donor:
        np.testing.assert_array_equal(got[slot], old[slot], strict=True)
      else:
        assert got[slot] is fresh[slot]
  detail = report.actions('params/head/kernel')[0].detail
  assert detail == 'columns by label: 0..4 <- donor columns 0..4; new: 5..9 (kept)'
  (source,) = report.sources
  assert len(source['sha256']) == 64 and source['keys_read']


@pytest.mark.parametrize('form', list(FORMS))
def test_each_donor_form_warm_starts_the_batchnorm_net(form, tmp_path, donor,
                                                       target):
  save, has_slots = FORMS[form]
  path, extra = save(os.path.join(tmp_path, 'donor'), donor)
  entry = {'name': 'warm_start', 'donor': path, 'labels': LABELS,
           'opt_state': 'donor' if has_slots else 'fresh', **extra}
  rng = jax.random.key(0)
  out, report = hooks.apply(target, [entry], rng=rng, fresh=lambda: target)
  assert type(out) is models.BNTrainState
  _check_warm_start(out, report, donor, target, slots_from_donor=has_slots)


def test_a_params_msgpack_and_a_legacy_flax_optim_file_fill_the_params(
    tmp_path, donor, target):
  """Bare params and flax.optim's `target/`: params only, no statistics."""
  bare = os.path.join(tmp_path, 'params.msgpack')
  with open(bare, 'wb') as f:
    f.write(flax.serialization.to_bytes(donor.params))
  legacy = os.path.join(tmp_path, 'checkpoint_7')
  param_states = jax.tree.map(
      lambda p: {'grad_ema': np.zeros_like(p), 'grad_sq_ema': np.ones_like(p)},
      donor.params)
  with open(legacy, 'wb') as f:
    f.write(flax.serialization.msgpack_serialize({
        'target': jax.tree.map(np.asarray, donor.params),
        'state': {'step': np.int64(7), 'param_states': param_states}}))
  for path in (bare, legacy):
    entry = {'name': 'warm_start', 'donor': path, 'labels': LABELS,
             'exclude': ['BatchNorm_0/mean', 'BatchNorm_0/var']}
    out, _ = hooks.apply(target, [entry], rng=jax.random.key(0),
                         fresh=lambda: target)
    got, old = hooks.flatten(out), hooks.flatten(donor)
    np.testing.assert_array_equal(got['params/Conv_0/kernel'],
                                  old['params/Conv_0/kernel'], strict=True)
    np.testing.assert_array_equal(got['params/head/kernel'][:, :5],
                                  old['params/head/kernel'], strict=True)
    assert got['batch_stats/BatchNorm_0/mean'] is hooks.flatten(target)[
        'batch_stats/BatchNorm_0/mean']
