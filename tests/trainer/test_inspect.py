"""`python -m trainer.inspect`: exact golden outputs."""

import os

import pytest

from tests.trainer import runs
from trainer import inspect
from trainer.__main__ import main

GOLDEN = os.path.join(os.path.dirname(__file__), 'golden')
LEGACY = os.path.join(os.path.dirname(runs.REPO), 'shared', 'fixtures',
                      'legacy_flax_optim', 'adam', 'checkpoint_20')


def _golden(name):
  with open(os.path.join(GOLDEN, name)) as f:
    return f.read()


def test_legacy_fixture(capsys):
  if not os.path.exists(LEGACY):
    pytest.skip(f'the legacy fixture is not at {LEGACY}')
  assert inspect.main(['inspect', LEGACY]) == 0
  assert capsys.readouterr().out == _golden('inspect_legacy_adam.txt')


def test_default_model_checkpoint(tmp_path, capsys):
  config = os.path.join(runs.REPO, 'configs', 'default.py')
  assert main(['trainer', f'--config={config}', f'--workdir={tmp_path}',
               '--config.num_train_steps=1', '--config.data_source=embedded',
               '--config.progress_bar=off']) == 0
  capsys.readouterr()
  assert inspect.main(['inspect', str(tmp_path / 'checkpoints' / '0')]) == 0
  assert capsys.readouterr().out == _golden('inspect_default_step0.txt')
  assert inspect.main(['inspect', str(tmp_path), '--filter', 'Dense_1/bias']
                      ) == 0
  lines = capsys.readouterr().out.splitlines()
  assert [line.split()[0] for line in lines[1:-1]] == [
      'opt_state/inner_state/0/trace/Dense_1/bias', 'params/Dense_1/bias']
  assert lines[-1] == '2 arrays, 20 values, 80 bytes'


def test_bad_paths(tmp_path, capsys):
  assert inspect.main(['inspect', str(tmp_path / 'absent')]) == 1
  assert 'does not exist' in capsys.readouterr().err
  assert inspect.main(['inspect']) == 2
  assert inspect.main(['inspect', str(tmp_path), '--filter', '(']) == 2
