"""`python -m trainer.inspect`: exact golden outputs, the step it shows."""

import os
import shutil

import pytest

from tests import legacy as legacy_lib
from tests.trainer import runs
from trainer import inspect
from trainer.__main__ import main

GOLDEN = os.path.join(os.path.dirname(__file__), 'golden')
LEGACY = legacy_lib.CHECKPOINT


def _golden(name):
  with open(os.path.join(GOLDEN, name)) as f:
    return f.read()


def _header_and_table(out):
  header, _, rest = out.partition('\n')
  return header, rest


def test_legacy_fixture(capsys):
  if not os.path.exists(LEGACY):
    pytest.skip(f'the legacy fixture is not at {LEGACY}')
  assert inspect.main(['inspect', LEGACY]) == 0
  header, table = _header_and_table(capsys.readouterr().out)
  assert header == (f'{LEGACY}: step 20 (flax-optim-msgpack); the only step '
                    'there')
  assert table == _golden('inspect_legacy_adam.txt')


def test_legacy_step_is_read_from_the_file(tmp_path, capsys):
  if not os.path.exists(LEGACY):
    pytest.skip(f'the legacy fixture is not at {LEGACY}')
  path = str(tmp_path / 'legacy.msgpack')  # No step in the name.
  shutil.copyfile(LEGACY, path)
  assert inspect.main(['inspect', path, '--filter', 'state/step']) == 0
  assert capsys.readouterr().out.splitlines()[0] == (
      f'{path}: step 20 (flax-optim-msgpack)')


def test_default_model_checkpoint(tmp_path, capsys):
  config = os.path.join(runs.REPO, 'configs', 'default.py')
  assert main(['trainer', f'--config={config}', f'--workdir={tmp_path}',
               '--config.num_train_steps=1', '--config.data_source=embedded',
               '--config.progress_bar=off']) == 0
  capsys.readouterr()
  step0 = str(tmp_path / 'checkpoints' / '0')
  assert inspect.main(['inspect', step0]) == 0
  header, table = _header_and_table(capsys.readouterr().out)
  assert header == (f"{step0}: step 0 (orbax-manager-step, item 'state'); "
                    'steps available: 0, 1 (--step N shows another)')
  assert table == _golden('inspect_default_step0.txt')
  assert inspect.main(['inspect', str(tmp_path), '--filter', 'Dense_1/bias']
                      ) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == (f"{tmp_path}: step 1 (orbax-manager-step, item "
                      "'state'); steps available: 0, 1 (--step N shows "
                      'another)')
  assert [line.split()[0] for line in lines[2:-1]] == [
      'opt_state/inner_state/0/trace/Dense_1/bias', 'params/Dense_1/bias']
  assert lines[-1] == '2 arrays, 20 values, 80 bytes'
  assert inspect.main(['inspect', str(tmp_path), '--step', '0']) == 0
  header, table = _header_and_table(capsys.readouterr().out)
  assert header.startswith(f'{tmp_path}: step 0 (')
  assert table == _golden('inspect_default_step0.txt')
  assert inspect.main(['inspect', str(tmp_path), '--step', '5']) == 1
  assert 'no checkpoint of step 5; its steps are [0, 1]' in (
      capsys.readouterr().err)


def test_bad_paths(tmp_path, capsys):
  assert inspect.main(['inspect', str(tmp_path / 'absent')]) == 1
  assert 'does not exist' in capsys.readouterr().err
  assert inspect.main(['inspect']) == 2
  assert inspect.main(['inspect', str(tmp_path), '--filter', '(']) == 2
