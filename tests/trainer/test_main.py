"""The entry point: an end-to-end tiny run and the bad-input table, in-process."""

import json
import re
import os
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds

from tests.trainer import runs
from trainer.__main__ import main

TINY = os.path.join(runs.REPO, 'configs', 'tiny.py')


_tree = runs.file_tree


def test_tiny_run_end_to_end(tmp_path, capsys):
  workdir = tmp_path / 'run'
  assert main(['trainer', f'--config={TINY}', f'--workdir={workdir}']) == 0
  out = capsys.readouterr().out
  assert 'final eval accuracy' in out
  # No hooks: one line, not a table of unchanged rows.
  assert ('nothing changed: all 16 params and optimizer slots unchanged'
          in out.splitlines())
  assert 'params/Conv_0/kernel' not in out
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['steps'] == 6 and summary['steps_this_run'] == 6
  assert summary['data_source'] == 'embedded'
  assert (summary['train_size'], summary['test_size']) == (4000, 1000)
  assert 0.0 <= summary['final_eval_accuracy'] <= 1.0
  assert summary['train_examples_per_sec'] > 0
  assert summary['device_count'] >= 1 and summary['device_kind']
  assert summary['cpu']
  assert set(summary['versions']) == {'jax', 'jaxlib', 'flax', 'optax'}
  assert f"{summary['final_eval_accuracy']:.4f}" in out
  events = [f for f in os.listdir(workdir) if f.startswith('events.out')]
  assert events, 'no TensorBoard event file'
  # keep_checkpoints=2 latest (4, 6); the best by accuracy is one of them.
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['4', '6']


BAD_INPUTS = [
    ('unknown key', ['--config.optimzer.name=adam'], 2, 'optimzer'),
    ('negative learning rate', ['--config.optimizer.learning_rate=-0.1'], 1,
     r'optimizer.learning_rate=-0.1 .*> 0'),
    ('zero learning rate', ['--config.optimizer.learning_rate=0.0'], 1,
     'optimizer.learning_rate=0.0'),
    ('zero batch size', ['--config.batch_size=0'], 1, r'batch_size=0 .*> 0'),
    ('negative batch size', ['--config.batch_size=-8'], 1, 'batch_size=-8'),
    ('zero steps', ['--config.num_train_steps=0'], 1,
     r'num_train_steps=0 .*> 0'),
    ('negative epochs', ['--config.num_epochs=-1'], 1, 'num_epochs=-1'),
    ('class outside 0-9', ['--config.classes=(0,12)'], 1,
     r'classes=\(0, 12\).*0\.\.9'),
    ('repeated class', ['--config.classes=(1,1,2)'], 1,
     r'classes=\(1, 1, 2\).*once'),
    ('one class', ['--config.classes=(3,)'], 1, r'classes=\(3,\).*two'),
    ('num_classes disagrees', ['--config.model.num_classes=5'], 1,
     r'model.num_classes=5.*10 digits'),
    ('unknown optimizer', ['--config.optimizer.name=rmsprop'], 1,
     r"optimizer.name='rmsprop'.*\['sgd', 'adam', 'adamw'\]"),
    ('unknown data source', ['--config.data_source=imagenet'], 1,
     r"data_source='imagenet'.*\['auto', 'embedded', 'tfds', 'idx'\]"),
    ('unknown model', ['--config.model.name=resnet'], 1,
     r"model.name='resnet'.*\['cnn'\]"),
    ('unknown schedule', ['--config.optimizer.schedule=step'], 1,
     r"optimizer.schedule='step'.*constant"),
    ('post_init hooks with init_from',
     ['--config.init_from=/nowhere', "--hook=post_init:reinit:{'patterns': "
      "['Dense_1/.*']}"], 1,
     r"post_init .*would never run: \['reinit'\].*pre_restore"),
]


@pytest.mark.parametrize('name,flags,code,pattern', BAD_INPUTS,
                         ids=[b[0] for b in BAD_INPUTS])
def test_bad_config_fails_and_writes_nothing(tmp_path, capsys, name, flags,
                                             code, pattern):
  del name
  workdir = tmp_path / 'run'
  assert main(['trainer', f'--config={TINY}', f'--workdir={workdir}',
               *flags]) == code
  err = capsys.readouterr().err
  assert re.search(pattern, err), err
  assert not workdir.exists()


def test_tfds_absent_without_network(tmp_path, capsys, monkeypatch):
  def no_network(self, *args, **kwargs):
    raise ConnectionError('Network is unreachable')
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare',
                      no_network)
  workdir = tmp_path / 'run'
  assert main(['trainer', f'--config={TINY}', f'--workdir={workdir}',
               '--config.data_source=tfds',
               f'--config.data_dir={tmp_path / "tfds"}']) == 1
  err = capsys.readouterr().err
  assert 'MNIST is not prepared' in err and 'manual_dir' in err
  assert not workdir.exists()


def test_workdir_that_is_a_file(tmp_path, capsys):
  path = tmp_path / 'file'
  path.write_text('not a directory')
  assert main(['trainer', f'--config={TINY}', f'--workdir={path}']) == 1
  assert 'is a file' in capsys.readouterr().err
  assert path.read_text() == 'not a directory'


def test_workdir_that_is_not_writable(capsys):
  # procfs refuses new files even to root, unlike a chmod-ed directory.
  assert main(['trainer', f'--config={TINY}',
               '--workdir=/proc/trainer-test/run']) == 1
  assert 'not writable' in capsys.readouterr().err


def test_missing_workdir_flag(capsys):
  assert main(['trainer', f'--config={TINY}']) == 1
  assert '--workdir is required' in capsys.readouterr().err


def test_resume_refuses_a_changed_fixed_field(tmp_path, capsys):
  workdir = tmp_path / 'run'
  assert main(['trainer', f'--config={TINY}', f'--workdir={workdir}',
               '--config.num_train_steps=2']) == 0
  before = _tree(workdir)
  assert main(['trainer', f'--config={TINY}', f'--workdir={workdir}',
               '--config.seed=7', '--config.optimizer.momentum=0.5',
               '--config.num_train_steps=4']) == 1
  err = capsys.readouterr().err
  assert 'may not change on resume' in err
  assert 'seed: checkpoint has 0, config has 7' in err
  assert 'optimizer.momentum: checkpoint has 0.9, config has 0.5' in err
  assert 'num_train_steps' not in err  # That one may change.
  assert _tree(workdir) == before


def test_relative_workdir_and_donor_paths(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert main(['trainer', f'--config={TINY}', '--workdir=runs/a',
               '--config.num_train_steps=2']) == 0
  assert (tmp_path / 'runs' / 'a' / 'summary.json').exists()
  assert main(['trainer', f'--config={TINY}', '--workdir=runs/a',
               '--config.num_train_steps=3']) == 0  # Resumes.
  assert json.loads((tmp_path / 'runs' / 'a' / 'summary.json').read_text()
                    )['steps_this_run'] == 1
  assert main(['trainer', f'--config={TINY}', '--workdir=runs/b',
               '--config.num_train_steps=2', '--config.init_from=runs/a']) == 0


@pytest.mark.parametrize('module', ['trainer', 'trainer.plan',
                                    'trainer.inspect'])
def test_help_exits_0_and_lists_the_flags(module):
  result = subprocess.run([sys.executable, '-m', module, '--help'],
                          cwd=runs.REPO, env=runs.env(), capture_output=True,
                          text=True, check=False, timeout=600)
  assert result.returncode == 0, result.stderr
  assert f'python -m {module}' in result.stdout
  flags = (['--filter', '--step'] if module == 'trainer.inspect'
           else ['--config', '--workdir', '--hook'])
  for flag in flags:
    assert flag in result.stdout
  assert 'docs/config.md' in result.stdout
