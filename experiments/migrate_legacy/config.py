"""Migrate a flax.optim Adam checkpoint (step 20) and continue training it.

The fixture `<repo>/../shared/fixtures/legacy_flax_optim/adam/checkpoint_20`
holds the seed CNN (ten classes) and flax.optim Adam slots after 20 steps
(learning rate 1e-3, batch 64). Arms: `init_from` through the pre_restore
hook `migrate_flax_optim` (params, Adam moments and step carried), against
the same migration followed by `reset_slots` over every param (params
carried, fresh Adam slots). Loss of every step after the restore.
"""

from __future__ import annotations

import copy

import ml_collections

from configs import default
from experiments import common

LEGACY_STEP = 20  # The step the fixture was saved at (its optimizer.json).


def get_config(tiny: bool = False) -> ml_collections.ConfigDict:
  """Returns the experiment config (`tiny`: one seed, a few steps)."""
  config = ml_collections.ConfigDict()
  config.seeds = (0,) if tiny else (0, 1, 2)
  config.legacy = common.LEGACY_ADAM
  config.legacy_step = LEGACY_STEP
  steps = LEGACY_STEP + (4 if tiny else 100)
  base = common.embedded(default.get_config(), classes=tuple(range(10)),
                         steps=steps, eval_every=2 if tiny else 10,
                         checkpoint_every=steps, keep=2)
  base.log_every_steps = 1  # The loss of every step.
  base.batch_size = 64  # The legacy run's batch size.
  base.optimizer.name = 'adam'
  base.optimizer.learning_rate = 1e-3
  base.init_from = config.legacy
  config.arms = ml_collections.ConfigDict()
  config.arms.carried = copy.deepcopy(base)
  config.arms.carried.hooks.pre_restore = [common.hook('migrate_flax_optim')]
  config.arms.fresh_slots = copy.deepcopy(base)
  config.arms.fresh_slots.hooks.pre_restore = [
      common.hook('migrate_flax_optim'),
      common.hook('reset_slots', patterns=('.*',))]
  config.arm_order = ('carried', 'fresh_slots')
  config.labels = ml_collections.ConfigDict({
      'carried': 'migrated params and Adam slots',
      'fresh_slots': 'migrated params, fresh Adam slots'})
  # Steps after the restore in the loss table, and in the loss plot.
  config.table_steps = 3 if tiny else 10
  config.plot_steps = 4 if tiny else 40
  return config
