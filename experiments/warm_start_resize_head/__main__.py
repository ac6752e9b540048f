"""`python -m experiments.warm_start_resize_head [--tiny]`."""

import sys

from experiments import common

if __name__ == '__main__':
  sys.exit(common.main('warm_start_resize_head'))
