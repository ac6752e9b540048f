"""Warm start a ten-digit model from a donor run (for example one on digits 0-4).

One override is needed, the donor:

  python -m trainer --config=configs/warm_start.py --workdir=runs/warm \
      --config.hooks.post_init[0].donor=runs/donor

Conv and dense tensors are copied from the donor's latest checkpoint; the
head's columns follow the digit labels (the trainer adds the labels of its
head, `Dense_1`: a donor on digits 0-4 fills columns 0-4, the other columns
keep their fresh init). Optimizer slots and the step start fresh.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Returns the warm-start configuration."""
  config = default.get_config()
  config.num_epochs = 10
  config.hooks.post_init = [ml_collections.ConfigDict({
      'name': 'warm_start',
      'donor': '',  # Set on the command line: a workdir or a step directory.
      'include': ('.*',),
      'exclude': (),
      'on_shape_mismatch': 'error',
      'opt_state': 'fresh',
      'step': 'reset',
  })]
  return config
