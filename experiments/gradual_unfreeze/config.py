"""Head only (Conv_0, Conv_1, Dense_0 frozen), the rest unfrozen at step N.

Against experiment 2's arms (convolutions frozen throughout; everything
trainable), rerun here with the same donor, steps, batches and seeds, and the
head trained alone throughout. Every arm warm-starts from a 0-4 donor with
the head resized by class map.
"""

from __future__ import annotations

import copy

import ml_collections

from experiments.freeze_backbone import config as freeze_config

BODY = ('Conv_0/.*', 'Conv_1/.*', 'Dense_0/.*')


def get_config(tiny: bool = False) -> ml_collections.ConfigDict:
  """Returns the experiment config (`tiny`: one seed, a few steps)."""
  config = freeze_config.get_config(tiny)
  del config.timing
  target = freeze_config.target_config(tiny)
  config.unfreeze_step = 2 if tiny else 100  # N.
  # A checkpoint at N: the body must still be the donor's there.
  target.checkpoint_every_steps = config.unfreeze_step
  target.keep_checkpoints = target.num_train_steps // config.unfreeze_step + 1
  config.arms.gradual = copy.deepcopy(target)
  config.arms.gradual.freeze.patterns = BODY
  config.arms.gradual.freeze.unfreeze_steps = (config.unfreeze_step,) * len(
      BODY)
  config.arms.head_only = copy.deepcopy(target)
  config.arms.head_only.freeze.patterns = BODY
  config.arm_order = ('gradual', 'head_only', 'frozen', 'all_trainable')
  config.labels.gradual = 'head only, all unfrozen at step N'
  config.labels.head_only = 'head only throughout'
  config.labels.frozen = 'Conv_0, Conv_1 frozen (exp. 2)'
  config.labels.all_trainable = 'everything trainable (exp. 2)'
  config.frozen_params = ('Conv_0/kernel', 'Conv_0/bias', 'Conv_1/kernel',
                          'Conv_1/bias', 'Dense_0/kernel', 'Dense_0/bias')
  # Steps after N whose accuracy change the report gives.
  config.after = (2,) if tiny else (10, 20, 50)
  config.report_steps = (2, 4) if tiny else (50, 100, 110, 120, 150, 200)
  return config
