"""Continue a five-class run's checkpoint under a ten-digit config.

The donor of experiment 1 (digits 0-4) is continued in a new workdir through
`config.init_from` and the pre_restore hook `resize_head`: its step and
optimizer state (SGD momentum) are carried, the head columns of digits 5-9
are new (the layer's own init), with fresh momentum. Against experiment 1's
warm start (head resized by class map, fresh momentum), once with the donor's
step (so that both arms see the same batches) and once from step 0 as in
experiment 1.
"""

from __future__ import annotations

import copy

import ml_collections

from configs import default
from experiments import common
from experiments.warm_start_resize_head import config as warm_start_config


def get_config(tiny: bool = False) -> ml_collections.ConfigDict:
  """Returns the experiment config (`tiny`: one seed, a few steps)."""
  config = ml_collections.ConfigDict()
  config.seeds = (0,) if tiny else (0, 1, 2)
  config.old = warm_start_config.OLD
  config.new = warm_start_config.NEW
  config.donor = warm_start_config.donor_config(tiny)
  # Steps after the start at which the arms are compared (as in experiment 1).
  config.budgets = (0, 2, 4) if tiny else (0, 25, 50, 100, 200)
  every = config.budgets[1]
  offset = config.donor.num_train_steps
  if offset % every:
    raise ValueError(f'the donor steps ({offset}) must be a multiple of '
                     f'budgets[1] ({every}) for checkpoints at the budgets')
  from_donor = common.embedded(
      default.get_config(), classes=warm_start_config.ALL,
      steps=offset + config.budgets[-1], eval_every=2 if tiny else 5,
      checkpoint_every=every, keep=config.budgets[-1] // every + 1)
  config.arms = ml_collections.ConfigDict()
  config.arms.resume = copy.deepcopy(from_donor)
  config.arms.resume.hooks.pre_restore = [
      common.hook('resize_head', layer='Dense_1', init='init')]
  config.arms.warm_donor_step = copy.deepcopy(from_donor)
  config.arms.warm_donor_step.hooks.post_init = [
      warm_start_config.warm_start(step='donor')]
  config.arms.warm_step_0 = warm_start_config.arms(
      warm_start_config.target_config(tiny, config.budgets)).warm_resized
  config.arm_order = ('resume', 'warm_donor_step', 'warm_step_0')
  config.labels = ml_collections.ConfigDict({
      'resume': '(a) init_from + resize_head: step and momentum carried',
      'warm_donor_step': '(b) warm start, fresh momentum, donor\'s step',
      'warm_step_0': '(c) warm start of experiment 1 (step 0)'})
  return config
