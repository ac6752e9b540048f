"""Fine-tune a donor's head and dense layers with the convolutions frozen.

  python -m trainer --config=configs/finetune_frozen.py --workdir=runs/ft \
      --config.hooks.post_init[0].donor=runs/donor

Frozen params carry no optimizer slots and stay bit-identical; add
`--config.freeze.unfreeze_steps='(200, 200)'` to unfreeze them at step 200.
"""

import ml_collections

from configs import warm_start


def get_config() -> ml_collections.ConfigDict:
  """Returns the frozen-backbone fine-tuning configuration."""
  config = warm_start.get_config()
  config.freeze.patterns = ('Conv_0/.*', 'Conv_1/.*')
  return config
