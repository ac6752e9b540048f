"""`python -m experiments.migrate_legacy [--tiny]`."""

import sys

from experiments import common

if __name__ == '__main__':
  sys.exit(common.main('migrate_legacy'))
