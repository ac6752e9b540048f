"""Command-line pieces shared by `trainer`, `trainer.plan` and `trainer.inspect`."""

from __future__ import annotations

import ast
import os
import re
from typing import Any, Sequence

from absl import flags
from absl import logging
from ml_collections import config_flags

# config_flags cannot index lists; hook entries are lists of ConfigDicts.
_HOOK_OVERRIDE = re.compile(
    r'--config\.hooks\.(?P<phase>\w+)\[(?P<index>-?\d+)\]\.(?P<field>\w+)'
    r'=(?P<value>.*)', re.DOTALL)


def _parse_value(text: str, current: Any) -> Any:
  if isinstance(current, str):
    return text
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if current is None:
      return text
    raise flags.Error(f'cannot parse {text!r} as a {type(current).__name__}')


def apply_hook_overrides(config: Any, overrides: Sequence[str]) -> None:
  """Applies `--config.hooks.PHASE[I].FIELD=VALUE` to the config's hook lists.

  Args:
    config: the parsed config.
    overrides: the matching command-line arguments.

  Raises:
    flags.Error: an unknown phase or an index out of range.
  """
  for arg in overrides:
    match = _HOOK_OVERRIDE.fullmatch(arg)
    phase, index = match['phase'], int(match['index'])
    if phase not in config.hooks:
      raise flags.Error(f'{arg}: unknown hook phase {phase!r}; use one of '
                        f'{sorted(config.hooks.keys())}')
    entries = config.hooks[phase]
    if not 0 <= index < len(entries):
      raise flags.Error(
          f'{arg}: index {index} is out of range: config.hooks.{phase} has '
          f'{len(entries)} entries' + (f' (0..{len(entries) - 1})'
                                       if entries else ''))
    entry, field = entries[index], match['field']
    with entry.unlocked():
      entry[field] = _parse_value(match['value'], entry.get(field))


HELP = ('-h', '--help', '--helpshort', '--helpfull')


class HelpRequested(Exception):
  """`-h`/`--help` was given; the message is the help text (exit status 0)."""


def help_text(doc: str, values: flags.FlagValues) -> str:
  """A command's docstring followed by its flags."""
  return f'{doc.strip()}\n\nflags:\n{values.get_help()}\n'


def parse_flags(argv: Sequence[str], doc: str = '') -> flags.FlagValues:
  """Parses argv into fresh flag values (so main can run many times in-process).

  Args:
    argv: the command line, program name first.

  Returns:
    The parsed flags: config, workdir and the multi-process settings.

  Raises:
    flags.Error: an unknown flag or config key, or a value of the wrong type.
    HelpRequested: `-h` or `--help` was given (the help text, built from
      `doc` and the flags).
  """
  hook_overrides = [a for a in argv if _HOOK_OVERRIDE.fullmatch(a)]
  argv = [a for a in argv if not _HOOK_OVERRIDE.fullmatch(a)]
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
  if any(arg in HELP for arg in argv[1:]):
    raise HelpRequested(help_text(doc, values))
  values(argv)
  if values.config is None:
    raise flags.Error('--config is required, e.g. --config=configs/default.py')
  apply_hook_overrides(values.config, hook_overrides)
  return values


class _QuietLibraries:
  """Drops INFO lines of orbax (dozens per checkpoint); keeps its warnings."""

  def filter(self, record: Any) -> bool:
    return (record.levelno >= logging.converter.STANDARD_WARNING
            or f'{os.sep}orbax{os.sep}' not in record.pathname)


def setup_logging() -> None:
  """absl logging at INFO on stderr, without orbax's INFO chatter."""
  flags.FLAGS.mark_as_parsed()  # Our flags live in their own FlagValues.
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())


