"""Fine-tune ten digits from a 0-4 donor with Conv_0 and Conv_1 frozen.

Arms: the convolutions frozen (config.freeze.patterns) against everything
trainable, both warm-started from the same donor with the head resized by
class map. Accuracy, train step time (both steps timed side by side in one
process, interleaved) and a bit-identity check of the frozen tensors.
"""

from __future__ import annotations

import copy

import ml_collections

from configs import default
from experiments import common
from experiments.warm_start_resize_head import config as warm_start_config

BACKBONE = ('Conv_0/.*', 'Conv_1/.*')


def target_config(tiny: bool) -> ml_collections.ConfigDict:
  """Ten digits, warm-started from the donor with the head resized."""
  steps = 4 if tiny else 200
  config = common.embedded(default.get_config(),
                           classes=warm_start_config.ALL, steps=steps,
                           eval_every=2 if tiny else 10,
                           checkpoint_every=steps)
  config.hooks.post_init = [warm_start_config.warm_start()]
  return config


def get_config(tiny: bool = False) -> ml_collections.ConfigDict:
  """Returns the experiment config (`tiny`: one seed, a few steps)."""
  config = ml_collections.ConfigDict()
  config.seeds = (0,) if tiny else (0, 1, 2)
  config.donor = warm_start_config.donor_config(tiny)
  target = target_config(tiny)
  config.arms = ml_collections.ConfigDict()
  config.arms.frozen = copy.deepcopy(target)
  config.arms.frozen.freeze.patterns = BACKBONE
  config.arms.all_trainable = copy.deepcopy(target)
  config.arm_order = ('frozen', 'all_trainable')
  # Steps whose eval accuracy the report tabulates (multiples of eval_every).
  config.report_steps = (2, 4) if tiny else (10, 50, 100, 200)
  config.labels = ml_collections.ConfigDict({
      'frozen': 'Conv_0, Conv_1 frozen',
      'all_trainable': 'everything trainable'})
  # The tensors that must end bit-identical to the donor's in frozen arms.
  config.frozen_params = ('Conv_0/kernel', 'Conv_0/bias', 'Conv_1/kernel',
                          'Conv_1/bias')
  # Step timing: `rounds` rounds, each `steps_per_round` steps of every arm in
  # turn (the order alternates), after `warmup` steps each; medians reported.
  config.timing = ml_collections.ConfigDict({
      'rounds': 3 if tiny else 40, 'steps_per_round': 2 if tiny else 5,
      'warmup': 1 if tiny else 5, 'seed': 0})
  return config
