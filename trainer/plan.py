"""Dry run: `python -m trainer.plan --config=... --workdir=... [--config.X=...]`.

Builds the state abstractly (jax.eval_shape; donor metadata only), runs the
hooks a fresh start would run on it abstractly, and prints the table the
surgery report would hold. It allocates no parameter memory and writes
nothing. It takes the flags `python -m trainer` takes, hook entries included
(--hook, --config.hooks.PHASE=[...]; docs/config.md).
"""

from __future__ import annotations

import sys
from typing import Sequence

from absl import flags

from trainer import cli
from trainer import setup as setup_lib
from trainer import surgery
from trainer.errors import TrainerError


def main(argv: Sequence[str]) -> int:
  """Prints the plan of a run; returns the exit status (0, or 1/2 on bad input).

  Args:
    argv: the same command line `python -m trainer` takes.
  """
  try:
    values = cli.parse_flags(argv, __doc__)
  except cli.HelpRequested as e:
    print(e)
    return 0
  except (flags.Error, KeyError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  cli.setup_logging()
  try:
    setup = setup_lib.prepare(values.config, values.workdir, load_data=False)
    if setup.latest_step is not None:
      print(f'{values.workdir} holds a checkpoint at step '
            f'{setup.latest_step}: a run resumes it and runs no hooks.')
      return 0
    report, origin = surgery.plan(setup)
  except TrainerError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'plan: start from {origin}; nothing is written.')
  for start, patterns in setup.freeze.phases:
    print(f'freeze from step {start}: {list(patterns) or "nothing"}')
  print(report.table())
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
