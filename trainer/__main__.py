"""Command line: `python -m trainer --config=configs/default.py --workdir=DIR`.

Parses flags and calls `train_and_evaluate`; the library does the work.
Several hosts: pass --coordinator_address, --num_processes and --process_id
(or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from absl import flags

from trainer import cli
from trainer import distributed
from trainer import train
from trainer.errors import TrainerError


def main(argv: Sequence[str]) -> int:
  """Runs training from a command line; returns the exit status.

  Args:
    argv: the command line, program name first.

  Returns:
    0 on success, 2 for bad flags, 1 for any other bad input.
  """
  try:
    values = cli.parse_flags(argv, __doc__)
  except cli.HelpRequested as e:
    print(e)
    return 0
  except (flags.Error, KeyError) as e:  # ml_collections raises KeyError.
    print(f'error: {e}', file=sys.stderr)
    return 2
  cli.setup_logging()
  try:
    distributed.initialize(values.coordinator_address, values.num_processes,
                           values.process_id)
    summary = train.train_and_evaluate(values.config, values.workdir)
  except TrainerError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f"final eval accuracy {summary['final_eval_accuracy']:.4f} "
        f"(loss {summary['final_eval_loss']:.4f}) after {summary['steps']} "
        f"steps; summary in {os.path.join(values.workdir, 'summary.json')}")
  return 0


if __name__ == '__main__':
  # TensorFlow, imported by clu's TensorBoard writer, logs its C++ set-up at
  # INFO; keep its warnings.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  sys.exit(main(sys.argv))
