"""Adam's counts through the trainer: one per tensor, grown by a resize and
resumed bitwise; a checkpoint of an older run (one count per element) resumes
with one count per tensor and trains on bit for bit."""

import jax
import ml_collections
import numpy as np
import pytest

import hooks
from tests.trainer import runs
from trainer import checkpoint
from trainer import Run
from trainer import train

COUNT = 'opt_state/inner_state/0/count/{}'


def _adam(**overrides):
  return runs.tiny_config(**{'optimizer.name': 'adam',
                             'optimizer.learning_rate': 1e-3, **overrides})


@pytest.fixture(scope='module')
def donor(tmp_path_factory):
  """A tiny Adam run on digits 0-4: checkpoints at steps 2, 4 and 6."""
  workdir = str(tmp_path_factory.mktemp('donor'))
  train.train_and_evaluate(_adam(classes=(0, 1, 2, 3, 4)), workdir)
  return workdir


def test_counts_are_one_per_tensor(donor):
  state = runs.final_state(donor)
  for key in [k for k in state if k.startswith('params/')]:
    count = state[COUNT.format(key[len('params/'):])]
    assert count.shape == (1,) * state[key].ndim and count.dtype == np.int32
    np.testing.assert_array_equal(count, 6)
  adam = sum(v.nbytes for k, v in state.items() if '/0/' in k)
  params = sum(v.nbytes for k, v in state.items() if k.startswith('params/'))
  assert 2 < adam / params <= 2.05


def test_a_resized_head_resumes_bitwise_with_its_grown_count(donor, tmp_path):
  def config(steps):
    c = _adam(num_train_steps=steps, init_from=donor)
    c.hooks.pre_restore = [ml_collections.ConfigDict({'name': 'resize_head'})]
    return c
  train.train_and_evaluate(config(10), str(tmp_path / 'whole'))
  parts = str(tmp_path / 'parts')
  for steps in (8, 10):
    train.train_and_evaluate(config(steps), parts)
  whole = runs.final_state(str(tmp_path / 'whole'))
  runs.assert_bitwise_equal(whole, runs.final_state(parts))
  # Columns 0-4 came from the donor at step 6; 5-9 started at count 0.
  np.testing.assert_array_equal(whole[COUNT.format('Dense_1/kernel')],
                                [[10] * 5 + [4] * 5])
  np.testing.assert_array_equal(whole[COUNT.format('Dense_0/kernel')], [[10]])


def test_a_per_element_checkpoint_resumes_with_one_count_per_tensor(
    donor, tmp_path):
  # An older run's step 4: the same state with a count per element.
  run = Run.prepare(_adam(classes=(0, 1, 2, 3, 4)), donor, load_data=False)
  flat = hooks.flatten(jax.device_get(run.restore(4)))
  params = {k[len('params/'):]: v for k, v in flat.items()
            if k.startswith('params/')}
  for path, param in params.items():
    flat[COUNT.format(path)] = np.broadcast_to(
        flat[COUNT.format(path)], param.shape).copy()
  old = str(tmp_path / 'old')
  ckpt_dir = checkpoint.directory(donor)
  manager = checkpoint.writer(old, keep=20)
  checkpoint.save(manager, 4, hooks.unflatten(flat, run.restore(4)),
                  checkpoint.read_json(ckpt_dir, 4, 'config'),
                  checkpoint.read_json(ckpt_dir, 4, 'meta'))
  manager.close()
  stored = runs.final_state(old, 4)
  assert stored[COUNT.format('Dense_0/kernel')].shape == (3136, 256)

  restored = hooks.flatten(Run.prepare(_adam(classes=(0, 1, 2, 3, 4)), old,
                                       load_data=False).restore(4))
  assert restored[COUNT.format('Dense_0/kernel')].shape == (1, 1)
  np.testing.assert_array_equal(restored[COUNT.format('Dense_0/kernel')], 4)
  # Resumed to step 6, it is the donor's own run, bit for bit.
  train.train_and_evaluate(_adam(classes=(0, 1, 2, 3, 4)), old)
  assert checkpoint.steps(old) == [4, 6]
  runs.assert_bitwise_equal(runs.final_state(old), runs.final_state(donor))
