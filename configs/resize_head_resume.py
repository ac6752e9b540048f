"""Continue a run under more classes: its step and optimizer state carried.

One override is needed, the run to continue (its workdir or a step
directory), e.g. a run on digits 0-4:

  python -m trainer --config=configs/resize_head_resume.py \
      --workdir=runs/resized --config.init_from=runs/donor

The pre_restore hook `resize_head` gives the head (`Dense_1`) a column per
digit of `config.classes`: the trainer fills in the head layer, the digits
the checkpoint was trained on (from its metadata) and this run's, so the
old digits keep their columns and momentum and the new ones start from the
layer's own init with fresh slots. Every other param, the optimizer state
and the step are restored as they are; the report notes which digit went
to which column. Give the optimizer the run was trained with (SGD with
momentum here, as configs/default.py), so that its state fits.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Returns the head-resizing configuration."""
  config = default.get_config()
  config.classes = tuple(range(10))
  config.init_from = ''  # Set on the command line: the run to continue.
  config.hooks.pre_restore = [
      ml_collections.ConfigDict({'name': 'resize_head', 'init': 'init'})]
  return config
