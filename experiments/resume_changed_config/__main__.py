"""`python -m experiments.resume_changed_config [--tiny]`."""

import sys

from experiments import common

if __name__ == '__main__':
  sys.exit(common.main('resume_changed_config'))
