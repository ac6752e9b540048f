"""Continue a legacy flax.optim checkpoint (the seed CNN) under optax.

One override is needed, the checkpoint:

  python -m trainer --config=configs/migrate_legacy.py --workdir=runs/migrated \
      --config.init_from=path/to/checkpoint_20

The pre_restore hook `migrate_flax_optim` turns the file's `target` into the
params, flax.optim Adam's `grad_ema`/`grad_sq_ema` into the optax Adam
moments (a Momentum checkpoint's `momentum` into SGD's trace) and its step
into the run's step and Adam's counts; training continues from that step.
Give the optimizer the legacy run's settings: Adam with learning rate 1e-3
here; for a legacy Momentum checkpoint, pass --config.optimizer.name=sgd
and its --config.optimizer.learning_rate and momentum.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Returns the migration configuration."""
  config = default.get_config()
  config.optimizer.name = 'adam'
  config.optimizer.learning_rate = 1e-3
  config.batch_size = 64  # The legacy run's batch size.
  config.init_from = ''  # Set on the command line: the legacy msgpack file.
  config.hooks.pre_restore = [
      ml_collections.ConfigDict({'name': 'migrate_flax_optim'})]
  return config
