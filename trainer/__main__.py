"""Command line: `python -m trainer --config=configs/default.py --workdir=DIR`.

Parses flags and calls `train_and_evaluate`; the library does the work.
Several hosts: pass --coordinator_address, --num_processes and --process_id
(or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

from absl import flags
from absl import logging
from ml_collections import config_flags

from trainer import distributed
from trainer import train
from trainer.errors import TrainerError


def parse_flags(argv: Sequence[str]) -> flags.FlagValues:
  """Parses argv into fresh flag values (so main can run many times in-process).

  Args:
    argv: the command line, program name first.

  Returns:
    The parsed flags: config, workdir and the multi-process settings.

  Raises:
    flags.Error: an unknown flag or config key, or a value of the wrong type.
  """
  argv = list(argv)
  values = flags.FlagValues()
  config_flags.DEFINE_config_file(
      'config', None, 'Training config file (configs/*.py).',
      flag_values=values, lock_config=True, sys_argv=argv)
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics '
                      'and summary.json.', flag_values=values)
  flags.DEFINE_string('coordinator_address',
                      os.environ.get('JAX_COORDINATOR_ADDRESS'),
                      'host:port of process 0, for multi-process runs.',
                      flag_values=values)
  flags.DEFINE_integer('num_processes',
                       int(os.environ.get('JAX_NUM_PROCESSES', '1')),
                       'Number of processes in the run.', flag_values=values)
  flags.DEFINE_integer('process_id', int(os.environ.get('JAX_PROCESS_ID', '0')),
                       "This process's index.", flag_values=values)
  values(argv)
  if values.config is None:
    raise flags.Error('--config is required, e.g. --config=configs/default.py')
  return values


class _QuietLibraries:
  """Drops INFO lines of orbax (dozens per checkpoint); keeps its warnings."""

  def filter(self, record: Any) -> bool:
    return (record.levelno >= logging.converter.STANDARD_WARNING
            or f'{os.sep}orbax{os.sep}' not in record.pathname)


def _setup_logging() -> None:
  flags.FLAGS.mark_as_parsed()  # Our flags live in their own FlagValues.
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())


def main(argv: Sequence[str]) -> int:
  """Runs training from a command line; returns the exit status.

  Args:
    argv: the command line, program name first.

  Returns:
    0 on success, 2 for bad flags, 1 for any other bad input.
  """
  try:
    values = parse_flags(argv)
  except (flags.Error, KeyError) as e:  # ml_collections raises KeyError.
    print(f'error: {e}', file=sys.stderr)
    return 2
  _setup_logging()
  try:
    distributed.initialize(values.coordinator_address, values.num_processes,
                           values.process_id)
    summary = train.train_and_evaluate(values.config, values.workdir)
  except TrainerError as e:
    logging.error('%s', e)
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
