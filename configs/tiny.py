"""A few steps on the embedded data, for tests and smoke runs."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Returns a configuration that trains for a handful of steps."""
  config = default.get_config()
  config.data_source = 'embedded'
  config.batch_size = 32
  config.num_train_steps = 6
  config.eval_batch_size = 256
  config.log_every_steps = 2
  config.eval_every_steps = 3
  config.checkpoint_every_steps = 2
  config.keep_checkpoints = 2
  config.progress_bar = 'off'
  return config
