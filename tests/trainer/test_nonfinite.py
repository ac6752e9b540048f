"""The non-finite guard: a NaN stops the run before a checkpoint holds it."""

import itertools
import os

import jax
import numpy as np
import pytest

from tests.trainer import runs
from trainer import checkpoint
from trainer import Run
from trainer import steps
from trainer.__main__ import main

TINY = os.path.join(runs.REPO, 'configs', 'tiny.py')


def _all_finite(workdir, step):
  state = runs.final_state(str(workdir), step)
  return all(np.isfinite(v).all() for v in state.values())


def test_first_nonfinite_step_is_recorded_on_device(tiny_config, tmp_path):
  for check, expected in ((True, 2), (False, steps.ALL_FINITE)):
    tiny_config.stop_on_nonfinite = check
    run = Run.prepare(tiny_config, str(tmp_path))
    good = list(itertools.islice(run.train_batches(), 3))
    bad = dict(good[1], image=good[1]['image'].at[0, 0, 0, 0].set(np.nan))
    state, totals = run.fresh_state(), run.empty_metrics()
    for batch in (good[0], bad, good[2]):  # Steps 1, 2 (NaN), 3.
      state, totals = run.train_step(state, totals, batch)
    # Step 3 is NaN too (the state is); the earliest one is kept.
    assert int(jax.device_get(totals.compute()['first_nonfinite_step'])
               ) == expected


def test_nan_loss_stops_before_a_nonfinite_checkpoint(tmp_path, capsys):
  # Learning rate 1e6: step 2's loss is about 1e21, step 3's gradient norm
  # is infinite; eval at 3, checkpoints at 2, 4, 6.
  workdir = tmp_path / 'run'
  assert main(['trainer', f'--config={TINY}', f'--workdir={workdir}',
               '--config.optimizer.learning_rate=1e6']) == 1
  err = capsys.readouterr().err
  assert ('training stopped at step 3: the loss or the gradient norm of '
          'step 3 is NaN or infinite') in err
  assert 'learning rate too high' in err and 'learning_rate=1000000.0' in err
  assert 'No checkpoint after step 2 was written' in err
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['0', '2']
  assert all(_all_finite(workdir, s) for s in (0, 2))
  assert not (workdir / 'summary.json').exists()


@pytest.mark.filterwarnings('ignore:overflow encountered in cast')
def test_nonfinite_state_is_never_saved(tmp_path, capsys):
  # 1e39 is infinite in float32: the loss and gradients of step 1 are
  # finite, but the optimizer state holds the learning rate from step 0.
  workdir = tmp_path / 'run'
  assert main(['trainer', f'--config={TINY}', f'--workdir={workdir}',
               '--config.optimizer.learning_rate=1e39']) == 1
  err = capsys.readouterr().err
  assert ('training stopped at step 0: the state holds NaN or infinite '
          'values in 1 of its 19 arrays: opt_state/hyperparams/learning_rate'
          ) in err
  assert 'No checkpoint was written.' in err
  assert checkpoint.steps(str(workdir)) == []


def test_guard_off_trains_through(tmp_path):
  workdir = tmp_path / 'run'
  assert main(['trainer', f'--config={TINY}', f'--workdir={workdir}',
               '--config.optimizer.learning_rate=1e6',
               '--config.num_train_steps=4',
               '--config.stop_on_nonfinite=False']) == 0
  assert checkpoint.latest_step(str(workdir)) == 4
  assert not _all_finite(workdir, 4)
