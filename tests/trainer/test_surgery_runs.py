"""Surgery through the trainer, end to end: a 0-4 donor into a ten-digit model,
init_from with resize_head resumed twice, a legacy checkpoint, bad inputs."""

import os

from configs import finetune_frozen
from configs import tiny
from configs import warm_start
import numpy as np
import ml_collections
import pytest

from tests import legacy as legacy_lib
from tests.trainer import runs
from trainer import checkpoint
from trainer import train
from trainer.__main__ import main
from trainer.errors import CheckpointError
from trainer.errors import ConfigError
from trainer.errors import SurgeryError

TINY = os.path.join(runs.REPO, 'configs', 'tiny.py')
WARM = os.path.join(runs.REPO, 'configs', 'warm_start.py')
LEGACY = legacy_lib.CHECKPOINT


_tiny = runs.tiny_config


@pytest.fixture(scope='module')
def donor(tmp_path_factory):
  """A tiny run on digits 0-4 (five-class head)."""
  workdir = str(tmp_path_factory.mktemp('donor'))
  train.train_and_evaluate(_tiny(classes=(0, 1, 2, 3, 4)), workdir)
  return workdir


def _as_tiny(config):
  small = tiny.get_config()
  for key in ('data_source', 'batch_size', 'num_train_steps',
              'eval_batch_size', 'log_every_steps', 'eval_every_steps',
              'checkpoint_every_steps', 'progress_bar'):
    config[key] = small[key]
  config.keep_checkpoints = 20
  return config


def test_warm_start_from_a_five_digit_donor(donor, tmp_path):
  config = _as_tiny(warm_start.get_config())
  config.hooks.post_init[0].donor = donor
  train.train_and_evaluate(config, str(tmp_path))
  got = runs.final_state(str(tmp_path), step=0)
  given = runs.final_state(donor)
  fresh_dir = str(tmp_path / 'fresh')
  train.train_and_evaluate(_tiny(num_train_steps=1), fresh_dir)
  fresh = runs.final_state(fresh_dir, step=0)
  for layer in ('Conv_0', 'Conv_1', 'Dense_0'):
    for name in ('kernel', 'bias'):
      key = f'params/{layer}/{name}'
      np.testing.assert_array_equal(got[key], given[key], strict=True)
  kernel, bias = got['params/Dense_1/kernel'], got['params/Dense_1/bias']
  assert kernel.shape == (256, 10)
  np.testing.assert_array_equal(kernel[:, :5], given['params/Dense_1/kernel'])
  np.testing.assert_array_equal(bias[:5], given['params/Dense_1/bias'])
  np.testing.assert_array_equal(kernel[:, 5:],
                                fresh['params/Dense_1/kernel'][:, 5:])
  # Every optimizer slot has the new shape (fresh slots: SGD traces of 0).
  slots = [k for k in got if k.startswith('opt_state') and 'Dense_1' in k]
  assert slots and all(got[k].shape[-1] == 10 for k in slots)
  assert int(got['step']) == 0
  meta = checkpoint.read_json(checkpoint.directory(str(tmp_path)), 0, 'meta')
  (record,) = meta['surgery']['donors']
  assert record['path'].startswith(donor) and record['step'] == 6
  assert len(record['sha256']) == 64
  report = (tmp_path / 'surgery_report.json').read_text()
  assert 'copied' in report and 'Dense_1' in report


def test_warm_start_needs_one_override_on_the_command_line(donor, tmp_path,
                                                           capsys):
  workdir = tmp_path / 'run'
  assert main(['trainer', f'--config={WARM}', f'--workdir={workdir}',
               '--config.data_source=embedded', '--config.num_train_steps=2',
               '--config.eval_every_steps=2', '--config.progress_bar=off',
               f'--config.hooks.post_init[0].donor={donor}']) == 0
  assert 'copied' in capsys.readouterr().out


def test_init_from_with_resize_resumed_twice_is_bitwise_equal(donor,
                                                              tmp_path):
  def config(steps):
    c = _tiny(num_train_steps=steps, init_from=donor)
    c.hooks.pre_restore = [ml_collections.ConfigDict(
        {'name': 'resize_head', 'init': 'zeros'})]
    return c
  train.train_and_evaluate(config(12), str(tmp_path / 'whole'))
  parts = str(tmp_path / 'parts')
  for steps in (8, 10, 12):
    train.train_and_evaluate(config(steps), parts)
  whole = runs.final_state(str(tmp_path / 'whole'))
  runs.assert_bitwise_equal(whole, runs.final_state(parts))
  # The donor's step and optimizer state were carried: training went on at 6.
  start = runs.final_state(parts, step=6)
  given = runs.final_state(donor)
  np.testing.assert_array_equal(
      start['opt_state/inner_state/0/trace/Dense_1/kernel'][:, :5],
      given['opt_state/inner_state/0/trace/Dense_1/kernel'])
  np.testing.assert_array_equal(
      start['opt_state/inner_state/0/trace/Dense_1/kernel'][:, 5:], 0.0)
  meta = checkpoint.read_json(checkpoint.directory(parts), 12, 'meta')
  assert meta['surgery']['init_from']['step'] == 6


def test_frozen_finetune_keeps_the_donor_convolutions(donor, tmp_path):
  config = _as_tiny(finetune_frozen.get_config())
  config.optimizer.name = 'adamw'
  config.optimizer.weight_decay = 0.1
  config.optimizer.learning_rate = 1e-3
  config.hooks.post_init[0].donor = donor
  train.train_and_evaluate(config, str(tmp_path))
  end, given = runs.final_state(str(tmp_path)), runs.final_state(donor)
  for key in ('params/Conv_0/kernel', 'params/Conv_1/bias'):
    np.testing.assert_array_equal(end[key], given[key], strict=True)


def test_legacy_flax_optim_checkpoint_continues_training(tmp_path):
  if not os.path.exists(LEGACY):
    pytest.skip(f'the legacy fixture is not at {LEGACY}')
  config = _tiny(init_from=LEGACY, num_train_steps=24)
  config.optimizer.name = 'adam'
  config.optimizer.learning_rate = 1e-3
  config.hooks.pre_restore = [
      ml_collections.ConfigDict({'name': 'migrate_flax_optim'})]
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary['steps'] == 24 and summary['steps_this_run'] == 4
  start = runs.final_state(str(tmp_path), step=20)
  assert int(start['step']) == 20
  np.testing.assert_array_equal(
      start['opt_state/inner_state/0/count/Dense_1/kernel'], 20)


BAD = [
    ('donor missing', dict(post_init=[{'name': 'warm_start',
                                        'donor': '/nonexistent/donor'}]),
     CheckpointError, r'post_init\[0\]\.donor=.*/nonexistent/donor'),
    ('donor shape mismatch', dict(post_init=[{'name': 'warm_start',
                                               'donor': 'DONOR',
                                               'labels': []}]),
     SurgeryError, r'(?s)Dense_1/bias.*Dense_1/kernel'),
    ('label map digit the donor lacks',
     dict(post_init=[{'name': 'warm_start', 'donor': 'DONOR',
                      'labels': [{'layers': 'Dense_1', 'map': {9: 7}}]}]),
     SurgeryError, r'7'),
    ('label map without a named layer',
     dict(post_init=[{'name': 'warm_start', 'donor': 'DONOR',
                      'labels': [{'map': {9: 4}}]}]),
     ConfigError, r"post_init\[0\].*'layers'"),
    ('class_map is no parameter any more',
     dict(post_init=[{'name': 'warm_start', 'donor': 'DONOR',
                      'class_map': {9: 4}}]),
     ConfigError, r"unknown parameter\(s\) \['class_map'\]"),
    ('init_from missing', dict(init_from='/nonexistent/run'),
     CheckpointError, r'init_from=.*/nonexistent/run'),
    ('init_from not a checkpoint', dict(init_from='CONFIGS'),
     CheckpointError, r'init_from'),
]


@pytest.mark.parametrize('name,change,error,pattern', BAD,
                         ids=[b[0] for b in BAD])
def test_bad_surgery_input_fails_before_writing(donor, tmp_path, name, change,
                                                error, pattern):
  del name
  config = _tiny()
  for phase in ('post_init', 'pre_restore'):
    entries = change.get(phase, [])
    for entry in entries:
      if entry.get('donor') == 'DONOR':
        entry['donor'] = donor
    config.hooks[phase] = [ml_collections.ConfigDict(e) for e in entries]
  if 'init_from' in change:
    config.init_from = change['init_from'].replace(
        'CONFIGS', os.path.join(runs.REPO, 'configs'))
  workdir = tmp_path / 'run'
  with pytest.raises(error, match=pattern):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


def test_plan_and_start_each_open_a_donor_once(donor, tmp_path, monkeypatch,
                                               capsys):
  import hooks  # pylint: disable=import-outside-toplevel
  from trainer import plan  # pylint: disable=import-outside-toplevel
  opened = []
  original = hooks.donors.open_donor

  def counting(path, **kwargs):
    opened.append(path)
    return original(path, **kwargs)

  monkeypatch.setattr(hooks.donors, 'open_donor', counting)
  args = [f'--config={WARM}', f'--workdir={tmp_path / "run"}',
          '--config.data_source=embedded', '--config.num_train_steps=2',
          '--config.eval_every_steps=2', '--config.progress_bar=off',
          f'--config.hooks.post_init[0].donor={donor}']
  assert plan.main(['plan', *args]) == 0
  assert 'copied' in capsys.readouterr().out
  assert opened == [donor]
  opened.clear()
  assert main(['trainer', *args]) == 0
  assert opened == [donor]
