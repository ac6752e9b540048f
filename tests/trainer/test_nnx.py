"""config.model.api='nnx': the NNX CNN through the trainer's one state and step.

An NNX run's state has a Linen run's flat keys (those of an nnx.Optimizer over
the model, the step int32), its steps lower to the Linen run's programs, it
resumes bit for bit, and either run's checkpoint warm-starts the other.
"""

import re

import chex
from flax import nnx
import jax
import ml_collections
import numpy as np
import pytest

from configs import tiny
import hooks
from hooks import nnx_freeze
from hooks import nnx_state
from tests.trainer import runs
from trainer import inspect
from trainer import models
from trainer import plan
from trainer import resume
from trainer import Run
from trainer import setup as setup_lib
from trainer import steps
from trainer import train
from trainer import validation
from trainer.errors import CheckpointError
from trainer.errors import ConfigError


def _config(api, **overrides):
  config = tiny.get_config()
  config.model.api = api
  config.keep_checkpoints = 20
  for key, value in overrides.items():
    config[key] = value
  return config


def _setup(api, tmp_path, **overrides):
  return setup_lib.prepare(_config(api, **overrides), str(tmp_path / 'run'),
                           load_data=False)


@pytest.fixture(scope='module')
def nnx_run(tmp_path_factory):
  """A tiny NNX run (6 steps); neither step function is traced twice."""
  workdir = str(tmp_path_factory.mktemp('nnx'))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(steps, 'train_step',
                  chex.assert_max_traces(steps.train_step, n=1))
    patch.setattr(steps, 'eval_step',
                  chex.assert_max_traces(steps.eval_step, n=1))
    assert train.train_and_evaluate(_config('nnx'), workdir)['steps'] == 6
  return workdir


@pytest.fixture(scope='module')
def linen_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('linen'))
  train.train_and_evaluate(_config('linen'), workdir)
  return workdir


def test_model_api_is_validated():
  with pytest.raises(ConfigError, match=re.escape(
      "config.model.api='jax' is not allowed: use one of ['linen', 'nnx']")):
    validation.validate(_config('jax'))


def test_state_keys_are_those_of_an_nnx_optimizer(tmp_path):
  setup = _setup('nnx', tmp_path)
  state = setup_lib.initial_state(setup)
  model = state.apply_fn.model(state.params)
  assert isinstance(model, models.NnxCNN)
  optimizer = nnx.Optimizer(model, state.tx, wrt=nnx.Param)
  flat, nnx_flat = hooks.flatten(state), nnx_state.flatten((model, optimizer))
  assert sorted(flat) == sorted(nnx_flat)
  for key, value in flat.items():  # A fresh optimizer: the same values too.
    np.testing.assert_array_equal(value, nnx_flat[key], err_msg=key)
  # The one difference, by choice: the trainer's step is int32 for both APIs.
  assert flat['step'].dtype == np.int32 and nnx_flat['step'].dtype == np.uint32
  linen = setup_lib.abstract_state(_setup('linen', tmp_path))
  assert (hooks.expected_structure(hooks.flatten(linen))
          == hooks.expected_structure(flat))


def test_frozen_params_have_no_slots_as_with_an_nnx_freeze(tmp_path):
  setup = _setup('nnx', tmp_path,
                 freeze=ml_collections.ConfigDict(
                     {'patterns': ('Conv_.*',), 'unfreeze_steps': ()}))
  state = setup_lib.initial_state(setup)
  model = state.apply_fn.model(state.params)
  optimizer = nnx.Optimizer(
      model, setup.tx, wrt=nnx_freeze.freeze_filter(model, ['Conv_.*']))
  # The trainer freezes through hooks.freeze's partition for both APIs; the
  # slots are an nnx.Optimizer(wrt=...)'s, one partition level down.
  keys = {re.sub('inner_states/trainable/inner_state/', '', k)
          for k in hooks.flatten(state)}
  assert keys == set(nnx_state.flatten((model, optimizer)))
  assert not [k for k in keys if 'Conv' in k and k.startswith('opt_state')]


def test_steps_lower_to_the_linen_programs(tmp_path):
  # The same program, so the same step time (benchmarks/nnx_step.py measures it).
  batch = {'image': jax.ShapeDtypeStruct((32, 28, 28, 1), np.float32),
           'label': jax.ShapeDtypeStruct((32,), np.int32)}
  totals = jax.eval_shape(steps.TrainMetrics.empty)
  programs = {}
  for api in models.APIS:
    run = Run.prepare(_config(api), str(tmp_path / 'run'), load_data=False)
    state = run.abstract_state()
    programs[api] = (
        run.train_step.lower(state, totals, batch).as_text(),
        run.eval_step.lower(
            state, {**batch, 'mask': jax.ShapeDtypeStruct((32,), bool)}
        ).as_text())
  assert programs['nnx'] == programs['linen']


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(nnx_run, tmp_path):
  parts = str(tmp_path / 'parts')
  train.train_and_evaluate(_config('nnx', num_train_steps=3), parts)
  summary = train.train_and_evaluate(_config('nnx'), parts)
  assert summary['steps_this_run'] == 3
  runs.assert_bitwise_equal(runs.final_state(nnx_run),
                            runs.final_state(parts))


def test_resuming_under_the_other_api_is_refused(linen_run):
  with pytest.raises(CheckpointError, match=re.escape(
      "model.api: checkpoint has 'linen', config has 'nnx'")):
    setup_lib.prepare(_config('nnx'), linen_run, load_data=False)


def test_inspect_shows_the_linen_runs_table(nnx_run, linen_run, capsys):
  assert inspect.main(['inspect', nnx_run]) == 0
  nnx_table = capsys.readouterr().out.replace(nnx_run, 'RUN')
  assert inspect.main(['inspect', linen_run]) == 0
  assert nnx_table == capsys.readouterr().out.replace(linen_run, 'RUN')
  assert 'params/Dense_1/kernel' in nnx_table and 'step' in nnx_table


def _warm_start(donor):
  return [ml_collections.ConfigDict({'name': 'warm_start', 'donor': donor,
                                     'opt_state': 'donor', 'step': 'donor'})]


def test_warm_start_from_a_linen_run_copies_everything(linen_run, tmp_path):
  config = _config('nnx', num_train_steps=7)
  config.hooks.post_init = _warm_start(linen_run)
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary['steps'] == 7 and summary['steps_this_run'] == 1
  # Params, optimizer slots and counts bit for bit, the step by value.
  runs.assert_bitwise_equal(runs.final_state(str(tmp_path), step=6),
                            runs.final_state(linen_run, step=6))


def test_init_from_an_nnx_run_through_pre_restore_hooks(nnx_run, tmp_path):
  config = _config('linen', num_train_steps=7, init_from=nnx_run)
  config.hooks.pre_restore = [ml_collections.ConfigDict(
      {'name': 'reinit', 'patterns': ['Dense_1/.*']})]
  train.train_and_evaluate(config, str(tmp_path))
  start, given = (runs.final_state(str(tmp_path), step=6),
                  runs.final_state(nnx_run, step=6))
  for key in start:
    if 'Dense_1' not in key:
      np.testing.assert_array_equal(start[key], given[key], err_msg=key,
                                    strict=True)
  # reinit draws from the Linen model's initialisers; its slots start fresh.
  fresh = models.init_params(models.create('cnn', 10),
                             jax.random.key(config.seed))
  np.testing.assert_array_equal(start['params/Dense_1/kernel'],
                                fresh['Dense_1']['kernel'], strict=True)
  assert not np.array_equal(start['params/Dense_1/kernel'],
                            given['params/Dense_1/kernel'])
  np.testing.assert_array_equal(
      start['opt_state/inner_state/0/trace/Dense_1/kernel'], 0.0)


def test_plan_of_an_nnx_run_from_a_linen_donor(linen_run, tmp_path, capsys):
  workdir = tmp_path / 'run'
  assert plan.main([
      'plan', f'--config={runs.REPO}/configs/warm_start.py',
      f'--workdir={workdir}', '--config.model.api=nnx',
      f'--config.hooks.post_init[0].donor={linen_run}',
      '--config.hooks.post_init[0].opt_state=donor']) == 0
  out = capsys.readouterr().out
  for key in ('params/Conv_0/kernel',
              'opt_state/inner_state/0/trace/Conv_0/kernel'):
    assert re.search(rf'{key} .* copied from donor key {key}', out), out
  assert not workdir.exists()


def test_freeze_schedule_under_adamw_with_weight_decay(tmp_path):
  config = _config('nnx', num_train_steps=4, eval_every_steps=4)
  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 0.1
  config.freeze.patterns = ('Conv_0/.*',)
  config.freeze.unfreeze_steps = (2,)
  train.train_and_evaluate(config, str(tmp_path))
  at = {step: runs.final_state(str(tmp_path), step=step) for step in (0, 2, 4)}
  for name in ('kernel', 'bias'):
    key = f'params/Conv_0/{name}'
    np.testing.assert_array_equal(at[2][key], at[0][key], strict=True)
    assert not np.array_equal(at[4][key], at[2][key])
  assert not [k for k in at[2] if k.startswith('opt_state') and 'Conv_0' in k]
  # Unfrozen at step 2: Conv_0's slots start fresh (count 0), the others'
  # are carried by key (their per-element counts go on).
  np.testing.assert_array_equal(
      at[4]['opt_state/inner_state/0/count/Conv_0/kernel'], 2)
  np.testing.assert_array_equal(
      at[4]['opt_state/inner_state/0/count/Dense_0/kernel'], 4)


@pytest.mark.parametrize('api, refused', [('linen', False), ('nnx', True)])
def test_a_checkpoint_from_before_model_api_is_a_linen_run(api, refused):
  stored = resume.to_json_dict(_config('linen'))
  del stored['model']['api']  # Written before the field existed.
  current = resume.to_json_dict(_config(api))
  if refused:
    with pytest.raises(CheckpointError,
                       match="model.api: checkpoint has 'linen', config has "
                             "'nnx'"):
      resume.check(stored, current, 'old/checkpoints/4')
  else:
    assert resume.check(stored, current, 'old/checkpoints/4') == []
