"""Training: one trace per step function, resume equivalence, preemption."""

import os
import signal
import subprocess
import time

import chex
import pytest

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


LONG = ('--config.num_train_steps=150', '--config.checkpoint_every_steps=5',
        '--config.eval_every_steps=50', '--config.log_every_steps=10')


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('uninterrupted')
  assert main(['trainer', f'--config={TINY}', f'--workdir={workdir}',
               *LONG]) == 0
  return runs.final_state(str(workdir))


def _start_and_signal(workdir, sig, after_step):
  proc = subprocess.Popen(
      runs.trainer_command(f'--config={TINY}', f'--workdir={workdir}', *LONG),
      cwd=runs.REPO, env=runs.env(), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 240
  while (checkpoint.latest_step(str(workdir)) or 0) < after_step:
    assert proc.poll() is None, proc.communicate()[0]
    assert time.time() < deadline, 'no checkpoint appeared'
    time.sleep(0.05)
  proc.send_signal(sig)
  output, _ = proc.communicate(timeout=120)
  return proc.returncode, output


def test_sigkill_then_restart_is_bitwise_equal(tmp_path, uninterrupted):
  code, output = _start_and_signal(tmp_path, signal.SIGKILL, after_step=10)
  assert code == -signal.SIGKILL, output
  killed_at = checkpoint.latest_step(str(tmp_path))
  assert 10 <= killed_at < 150
  assert not (tmp_path / 'summary.json').exists()
  assert main(['trainer', f'--config={TINY}', f'--workdir={tmp_path}',
               *LONG]) == 0
  runs.assert_bitwise_equal(uninterrupted, runs.final_state(str(tmp_path)))


def test_sigterm_saves_and_exits_cleanly(tmp_path, uninterrupted):
  code, output = _start_and_signal(tmp_path, signal.SIGTERM, after_step=10)
  assert code == 0, output
  assert 'SIGTERM' in output
  stopped_at = checkpoint.latest_step(str(tmp_path))
  assert 10 <= stopped_at < 150
  assert main(['trainer', f'--config={TINY}', f'--workdir={tmp_path}',
               *LONG]) == 0
  runs.assert_bitwise_equal(uninterrupted, runs.final_state(str(tmp_path)))
