"""`python -m experiments.gradual_unfreeze [--tiny]`."""

import sys

from experiments import common

if __name__ == '__main__':
  sys.exit(common.main('gradual_unfreeze'))
