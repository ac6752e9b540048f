"""trainer.Run: a loop written over its parts is train_and_evaluate's run."""

import itertools
import re

import jax
import numpy as np
import pytest

from configs import tiny
import hooks
from tests.trainer import runs
from trainer import CheckpointError
from trainer import Run
from trainer import train


def _flat(state):
  return {k: np.asarray(v)
          for k, v in hooks.flatten(jax.device_get(state)).items()}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """The tiny config trained by train_and_evaluate (6 steps)."""
  workdir = str(tmp_path_factory.mktemp('trained'))
  return workdir, train.train_and_evaluate(tiny.get_config(), workdir)


def test_a_loop_over_the_run_is_the_trainers(trained, tmp_path):
  workdir, summary = trained
  run = Run.prepare(tiny.get_config(), str(tmp_path / 'own_loop'))
  start = run.start()
  assert not start.resumed and start.step == 0
  assert start.record['donors'] == [] and start.record['init_from'] is None
  state, totals = start.state, run.empty_metrics()
  for batch in itertools.islice(run.train_batches(start.step), 6):
    state, totals = run.train_step(state, totals, batch)
  runs.assert_bitwise_equal(_flat(state), runs.final_state(workdir))
  assert run.evaluate(state) == {'accuracy': summary['final_eval_accuracy'],
                                 'loss': summary['final_eval_loss']}
  # 1,000 test digits in batches of 256: the last one is padded.
  test = run.setup.data.test
  labels = run.predict(state, test.images)
  assert labels.shape == (test.size,)
  assert run.setup.schedule.eval_batch_size == 256
  assert (np.float32((labels == test.labels).mean())
          == np.float32(summary['final_eval_accuracy']))
  np.testing.assert_array_equal(run.predict(state, test.images, 500), labels)


def test_a_trained_workdir_resumes_and_restores_any_step(trained):
  workdir, _ = trained
  run = Run.prepare(tiny.get_config(), workdir)
  start = run.start()
  assert start.resumed and start.step == 6 and start.report is None
  runs.assert_bitwise_equal(_flat(start.state), runs.final_state(workdir))
  runs.assert_bitwise_equal(_flat(run.restore(4)),
                            runs.final_state(workdir, 4))
  with pytest.raises(CheckpointError, match=re.escape(
      'has no checkpoint step 5 (it has [4, 6]); restore one of them.')):
    run.restore(5)


def test_a_run_without_data_has_states_but_no_batches(tmp_path):
  run = Run.prepare(tiny.get_config(), str(tmp_path), load_data=False)
  assert jax.tree.structure(run.fresh_state()) == jax.tree.structure(
      run.abstract_state())
  with pytest.raises(ValueError, match='prepared with load_data=False'):
    next(run.train_batches())
  with pytest.raises(CheckpointError, match='holds no checkpoint to restore'):
    run.restore()
