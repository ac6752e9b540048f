"""Training: one trace per step function, resume equivalence, preemption."""

import os
import signal
import subprocess
import sys

import chex
import pytest

from tests.trainer import pausing
from tests.trainer import runs
from trainer import checkpoint
from trainer import steps
from trainer import train
from trainer.__main__ import main

TINY = os.path.join(runs.REPO, 'configs', 'tiny.py')


def test_step_functions_are_traced_once(tiny_config, tmp_path, monkeypatch):
  monkeypatch.setattr(steps, 'train_step',
                      chex.assert_max_traces(steps.train_step, n=1))
  monkeypatch.setattr(steps, 'eval_step',
                      chex.assert_max_traces(steps.eval_step, n=1))
  # 1,000 test examples in batches of 256: the last one is padded, and two
  # evaluations run; neither may retrace.
  summary = train.train_and_evaluate(tiny_config, str(tmp_path))
  assert summary['steps'] == 6


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, caplog):
  whole, parts = tmp_path / 'whole', tmp_path / 'parts'
  assert main(['trainer', f'--config={TINY}', f'--workdir={whole}']) == 0
  assert main(['trainer', f'--config={TINY}', f'--workdir={parts}',
               '--config.num_train_steps=3']) == 0
  assert checkpoint.latest_step(str(parts)) == 3
  caplog.clear()
  assert main(['trainer', f'--config={TINY}', f'--workdir={parts}',
               '--config.num_train_steps=6']) == 0
  assert 'config.num_train_steps changes from 3 to 6' in caplog.text
  runs.assert_bitwise_equal(runs.final_state(str(whole)),
                            runs.final_state(str(parts)))


def test_rerunning_a_finished_run_trains_no_more(tmp_path):
  assert main(['trainer', f'--config={TINY}', f'--workdir={tmp_path}']) == 0
  first = runs.final_state(str(tmp_path))
  assert main(['trainer', f'--config={TINY}', f'--workdir={tmp_path}']) == 0
  runs.assert_bitwise_equal(first, runs.final_state(str(tmp_path)))


# Long enough to signal mid-run: the child pauses at step 10 (no race).
LONG = ('--config.num_train_steps=16', '--config.checkpoint_every_steps=5',
        '--config.eval_every_steps=8', '--config.log_every_steps=4')


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('uninterrupted')
  assert main(['trainer', f'--config={TINY}', f'--workdir={workdir}',
               *LONG]) == 0
  return runs.final_state(str(workdir))


def _start_and_signal(workdir, sig, after_step):
  """Runs the trainer, signals it once step `after_step` is saved.

  The child pauses right after that checkpoint (tests/trainer/pausing.py)
  and says so on its output; reading up to that line is the handshake, so
  the signal lands at the same step on an idle or a loaded machine.
  """
  proc = subprocess.Popen(
      [sys.executable, '-m', 'tests.trainer.pausing', str(after_step),
       f'--config={TINY}', f'--workdir={workdir}', *LONG],
      cwd=runs.REPO, env=runs.env(), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  before = []
  for line in proc.stdout:  # Blocks until the child writes or exits.
    before.append(line)
    if line.startswith(pausing.PAUSED):
      break
  else:
    proc.wait()
    pytest.fail('the trainer ended before it paused:\n' + ''.join(before))
  proc.send_signal(sig)
  # A hang guard only: the child has at most one step and a save left.
  output, _ = proc.communicate(timeout=900)
  return proc.returncode, ''.join(before) + output


def test_sigkill_then_restart_is_bitwise_equal(tmp_path, uninterrupted):
  code, output = _start_and_signal(tmp_path, signal.SIGKILL, after_step=10)
  assert code == -signal.SIGKILL, output
  assert checkpoint.latest_step(str(tmp_path)) == 10
  assert not (tmp_path / 'summary.json').exists()
  assert main(['trainer', f'--config={TINY}', f'--workdir={tmp_path}',
               *LONG]) == 0
  runs.assert_bitwise_equal(uninterrupted, runs.final_state(str(tmp_path)))


def test_sigterm_saves_and_exits_cleanly(tmp_path, uninterrupted):
  code, output = _start_and_signal(tmp_path, signal.SIGTERM, after_step=10)
  assert code == 0, output
  assert 'SIGTERM: saving a checkpoint after this step' in output
  # The signal came while step 10 was being saved: step 11 finishes, saves.
  assert checkpoint.latest_step(str(tmp_path)) == 11
  assert 'after 11 steps' in output
  assert main(['trainer', f'--config={TINY}', f'--workdir={tmp_path}',
               *LONG]) == 0
  runs.assert_bitwise_equal(uninterrupted, runs.final_state(str(tmp_path)))
