"""`python -m experiments.freeze_backbone [--tiny]`."""

import sys

from experiments import common

if __name__ == '__main__':
  sys.exit(common.main('freeze_backbone'))
