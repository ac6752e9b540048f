"""Damaged checkpoints: a clear message, nothing changed, a way out."""

import os
import shutil

import pytest

from tests.trainer import runs
from trainer import checkpoint
from trainer import errors
from trainer.__main__ import main

TINY = os.path.join(runs.REPO, 'configs', 'tiny.py')


_tree = runs.file_tree


def _largest_file(step_dir):
  sizes = {f: s for f, (s, _) in _tree(step_dir).items()}
  return max(sizes, key=sizes.get)


def _truncate_largest(step_dir):
  path = _largest_file(step_dir)
  os.truncate(path, os.path.getsize(path) // 2)


def _remove(relative):
  return lambda step_dir: os.remove(os.path.join(step_dir, relative))


DAMAGE = {
    'largest data file cut in half': (_truncate_largest, 'OUT_OF_RANGE'),
    'largest data file missing': (lambda d: os.remove(_largest_file(d)),
                                  'is missing (a data file was deleted)'),
    'state metadata missing': (_remove('state/_METADATA'), 'state/_METADATA'),
    'ocdbt manifest missing': (_remove('state/manifest.ocdbt'),
                               'lists no stored values'),
    'config item missing': (_remove('config/metadata'), 'config/metadata'),
}


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """A finished tiny run (checkpoints 4 and 6) and its step-6 state."""
  workdir = tmp_path_factory.mktemp('finished') / 'run'
  assert main(['trainer', f'--config={TINY}', f'--workdir={workdir}']) == 0
  return workdir, runs.final_state(str(workdir), 6)


@pytest.fixture
def damaged(finished, tmp_path, request):
  workdir = tmp_path / 'run'
  shutil.copytree(finished[0], workdir)
  damage, _ = DAMAGE[request.param]
  damage(str(workdir / 'checkpoints' / '6'))
  return workdir


# orbax reads all arrays at once; the values are checked one at a time first
# (checkpoint.check_stored_values), so no read is left running to print an
# "Event loop is closed" traceback later.
@pytest.mark.filterwarnings('error::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('damaged', list(DAMAGE), indirect=True)
def test_damaged_latest_step_is_named_with_the_way_out(damaged, capsys,
                                                       request):
  before = _tree(damaged)
  assert main(['trainer', f'--config={TINY}', f'--workdir={damaged}',
               '--config.num_train_steps=8']) == 1
  err = capsys.readouterr().err
  ckpt_dir = damaged / 'checkpoints'
  assert (f'error: checkpoint {ckpt_dir}/6 cannot be read: it is damaged or '
          'incomplete (') in err
  assert DAMAGE[request.node.callspec.params['damaged']][1] in err
  assert 'Nothing was changed on disk.' in err
  assert ('To resume from step 4, the newest earlier checkpoint that reads '
          'back whole, run the same command with --config.resume_step=4: '
          f'the steps after it [6] are then moved to {damaged}/'
          'checkpoints_set_aside (not deleted)') in err
  assert _tree(damaged) == before


@pytest.mark.parametrize('damaged', ['largest data file cut in half'],
                         indirect=True)
def test_resume_step_sets_the_damaged_step_aside_and_trains_it_again(
    damaged, finished):
  damaged_files = _tree(damaged / 'checkpoints' / '6')
  assert main(['trainer', f'--config={TINY}', f'--workdir={damaged}',
               '--config.resume_step=4']) == 0
  aside = damaged / 'checkpoints_set_aside' / '6'
  assert {p.replace(str(aside), str(damaged / 'checkpoints' / '6')): v[0]
          for p, v in _tree(aside).items()} == {
              p: v[0] for p, v in damaged_files.items()}
  runs.assert_bitwise_equal(finished[1], runs.final_state(str(damaged), 6))
  # Later runs resume from the latest step again.
  assert main(['trainer', f'--config={TINY}', f'--workdir={damaged}',
               '--config.num_train_steps=7']) == 0
  assert checkpoint.latest_step(str(damaged)) == 7


@pytest.mark.parametrize('damaged', ['largest data file cut in half'],
                         indirect=True)
def test_resume_step_must_be_a_step_of_the_workdir(damaged, capsys):
  before = _tree(damaged)
  assert main(['trainer', f'--config={TINY}', f'--workdir={damaged}',
               '--config.resume_step=5']) == 1
  err = capsys.readouterr().err
  assert (f'config.resume_step=5 is not a checkpoint step of {damaged}/'
          'checkpoints (it has [4, 6])') in err
  assert _tree(damaged) == before


@pytest.mark.parametrize('damaged', ['largest data file cut in half'],
                         indirect=True)
def test_command_line_shows_no_traceback(damaged):
  result = runs.run_trainer(f'--config={TINY}', f'--workdir={damaged}')
  assert result.returncode == 1, result.stderr
  assert f'error: checkpoint {damaged}/checkpoints/6 cannot be read' in (
      result.stderr)
  assert 'Traceback' not in result.stderr
  assert 'sys.meta_path' not in result.stderr


def test_reading_names_the_innermost_error_and_passes_trainer_errors():
  def failing_read():
    try:
      raise ValueError('OUT_OF_RANGE: byte range [0, 9) is not valid '
                       '[tensorstore_spec=\'{"driver": "zarr"}\']')
    except ValueError as e:
      raise Exception('Encountered error while reading array') from e  # pylint: disable=broad-exception-raised

  with pytest.raises(errors.CheckpointError) as raised:
    with checkpoint.reading('/ckpt/7', 'Use another one.'):
      failing_read()
  assert str(raised.value) == (
      'checkpoint /ckpt/7 cannot be read: it is damaged or incomplete '
      '(ValueError: OUT_OF_RANGE: byte range [0, 9) is not valid). Nothing '
      'was changed on disk. Use another one.')
  with pytest.raises(errors.ConfigError, match='^as is$'):
    with checkpoint.reading('/ckpt/7', lambda: pytest.fail('not called')):
      raise errors.ConfigError('as is')


WARM = os.path.join(runs.REPO, 'configs', 'warm_start.py')


@pytest.mark.parametrize('damaged', ['largest data file cut in half'],
                         indirect=True)
@pytest.mark.parametrize('how', ['donor', 'init_from'])
def test_damaged_donor_or_init_from_is_named_without_traceback(
    damaged, tmp_path, how):
  """A damaged donor or init_from: a message, no traceback, nothing written."""
  target = tmp_path / 'target'
  before = _tree(damaged)
  if how == 'donor':
    args = [f'--config={WARM}', '--config.data_source=embedded',
            f'--config.hooks.post_init[0].donor={damaged}']
  else:
    args = [f'--config={TINY}', f'--config.init_from={damaged}']
  result = runs.run_trainer(*args, f'--workdir={target}',
                            '--config.num_train_steps=2')
  assert result.returncode == 1, result.stderr
  assert (f"Donor '{damaged}': the checkpoint step directory "
          f'{damaged}/checkpoints/6 is damaged') in result.stderr
  assert 'OUT_OF_RANGE' in result.stderr
  assert 'Pick another step (donor_step= in a hook entry' in result.stderr
  assert 'Traceback' not in result.stderr
  assert 'Event loop is closed' not in result.stderr
  assert not target.exists()
  assert _tree(damaged) == before
