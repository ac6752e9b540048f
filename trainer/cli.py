"""Command-line pieces shared by `trainer`, `trainer.plan` and `trainer.inspect`.

Hook entries come from the config file and from three kinds of flag, applied
in this order (docs/config.md, "Hooks on the command line"):

1. `--config.hooks.PHASE="[{'name': ..., ...}, ...]"` replaces a phase's list.
   The field is of type object (configs/default.py), so ml_collections parses
   the value with `ast.literal_eval`.
2. `--hook=PHASE:NAME` or `--hook=PHASE:NAME:{PARAMS}` appends one entry
   (repeatable, in the order given).
3. `--config.hooks.PHASE[I].FIELD=VALUE` sets one field of entry I (which may
   be one that --hook appended).

Values are Python literals; JSON's `true`, `false` and `null` inside a
list or dict are refused with the fix, since ml_collections would keep a
value holding them as a string (a lone `true`/`false` in a
`[I].FIELD=VALUE` override is absl's spelling of a bool and accepted). The entries then go through the same checks as a config file's
(trainer.setup, hooks.build).
"""

from __future__ import annotations

import ast
import collections.abc
import difflib
import io
import logging as std_logging
import os
import re
import tokenize
from typing import Any, Sequence

from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

# config_flags cannot index lists; hook entries are lists of entries.
_HOOK_OVERRIDE = re.compile(
    r'--config\.hooks\.(?P<phase>\w+)\[(?P<index>-?\d+)\]\.(?P<field>\w+)'
    r'=(?P<value>.*)', re.DOTALL)
_JSON_WORDS = {'true': 'True', 'false': 'False', 'null': 'None'}
_EXAMPLE = "\"[{'name': 'migrate_flax_optim'}]\""
HOOK_HELP = (
    'Appends a hook entry to a phase: PHASE:NAME or PHASE:NAME:{PARAMS}, '
    "PARAMS a Python dict literal, e.g. --hook=\"post_init:reinit:"
    "{'patterns': ['Dense_1/.*']}\" or --hook=post_init:my.module:my_hook. "
    'Repeatable; applied after --config.hooks.PHASE=[...] and before '
    '--config.hooks.PHASE[I].FIELD=VALUE (docs/config.md)')
DOCS = ('Every config key, and hook entries on the command line: '
        'docs/config.md.')


def _bare_names(text: str) -> list[str]:
  """Names in `text` that a Python literal cannot hold (unquoted words)."""
  try:
    tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
  except (tokenize.TokenError, SyntaxError):
    return []
  return list(dict.fromkeys(
      t.string for t in tokens
      if t.type == tokenize.NAME and t.string not in ('True', 'False', 'None')))


def _literal_hint(text: str) -> str:
  names = _bare_names(text)
  json_words = [n for n in names if n in _JSON_WORDS]
  if json_words:
    return ('it holds JSON; write ' + ', '.join(
        f'{_JSON_WORDS[n]} for {n}' for n in json_words) + ' (Python).')
  if names:
    return (f'quote the word(s) {names}, e.g. {names[0]!r}; on a shell, put '
            'the whole value in double quotes so that the single quotes '
            f'survive: {_EXAMPLE}.')
  return f'check its brackets, commas and quotes, e.g. {_EXAMPLE}.'


def parse_literal(text: str, what: str) -> Any:
  """Parses a Python literal given on the command line.

  Args:
    text: the value as typed.
    what: the flag, for the message.

  Returns:
    `ast.literal_eval(text)`.

  Raises:
    flags.Error: `text` is not a Python literal; the message names the value
      and the fix (JSON `true`, `false`, `null`; unquoted words).
  """
  try:
    return ast.literal_eval(text)
  except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
    raise flags.Error(f'{what}={text!r} is not a Python literal: '
                      f'{_literal_hint(text)}') from None


def _hook_list(value: Any, what: str) -> list[Any]:
  """A phase's value as a list of entries (mappings), or a flags.Error."""
  if isinstance(value, str):  # ml_collections keeps unparsable text as is.
    value = parse_literal(value, what)
  if (isinstance(value, (list, tuple))
      and all(isinstance(e, (collections.abc.Mapping,
                             ml_collections.ConfigDict)) for e in value)):
    return list(value)
  raise flags.Error(
      f'{what}={value!r} must be a list of hook entries (dicts with a '
      f"'name'), e.g. {what}={_EXAMPLE}; [] for none.")


def _phases(config: Any) -> list[str]:
  return sorted(config.hooks.keys())


def _unknown_phase(what: str, phase: str, config: Any) -> flags.Error:
  close = difflib.get_close_matches(phase, _phases(config), n=1)
  hint = f'did you mean {close[0]!r}? ' if close else ''
  return flags.Error(f'{what}: unknown hook phase {phase!r}; {hint}use one '
                     f'of {_phases(config)}.')


def parse_hook_flag(text: str, config: Any) -> tuple[str, dict[str, Any]]:
  """Parses one `--hook=PHASE:NAME[:{PARAMS}]` into (phase, entry).

  NAME is a registered hook or an import path `package.module:function`
  (which holds a ':' itself); PARAMS is a Python dict literal.

  Args:
    text: the flag's value.
    config: the parsed config (its hook phases).

  Returns:
    The phase and the entry `{'name': NAME, **PARAMS}`.

  Raises:
    flags.Error: a malformed value or an unknown phase.
  """
  what = f'--hook={text}'
  usage = ("write PHASE:NAME or PHASE:NAME:{PARAMS}, e.g. "
           "--hook=\"post_init:reinit:{'patterns': ['Dense_1/.*']}\"")
  phase, _, rest = text.partition(':')
  if not phase or not rest:
    raise flags.Error(f'{what}: {usage}.')
  if phase not in config.hooks:
    raise _unknown_phase(what, phase, config)
  name, brace, params_text = rest.partition('{')
  params: Any = {}
  if brace:
    if not name.endswith(':'):
      raise flags.Error(f'{what}: put a ":" between the hook name and its '
                        f'parameters; {usage}.')
    name = name[:-1]
    params = parse_literal(brace + params_text, f'{what}: parameters')
    if not isinstance(params, dict):
      raise flags.Error(f'{what}: the parameters must be a dict, got '
                        f'{params!r}; {usage}.')
    if 'name' in params:
      raise flags.Error(f"{what}: give the hook's name once, before the "
                        f'parameters; {usage}.')
  if not name:
    raise flags.Error(f'{what}: the hook name is empty; {usage}.')
  return phase, {'name': name, **params}


def _parse_value(text: str, current: Any, what: str) -> Any:
  if isinstance(current, str):
    return text
  if text in ('true', 'false'):  # absl's spelling of booleans.
    return text == 'true'
  try:
    return ast.literal_eval(text)
  except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
    if current is None and text[:1] not in ('[', '(', '{') and text != 'null':
      return text  # A new field's string, e.g. a donor path.
    raise flags.Error(
        f'{what}: cannot parse {text!r} as '
        + (f'a {type(current).__name__}' if current is not None
           else 'a Python literal') + f'; {_literal_hint(text)}') from None


def apply_hook_overrides(config: Any, overrides: Sequence[str]) -> None:
  """Applies `--config.hooks.PHASE[I].FIELD=VALUE` to the config's hook lists.

  Args:
    config: the parsed config.
    overrides: the matching command-line arguments.

  Raises:
    flags.Error: an unknown phase, an index out of range or a bad value.
  """
  for arg in overrides:
    match = _HOOK_OVERRIDE.fullmatch(arg)
    phase, index = match['phase'], int(match['index'])
    if phase not in config.hooks:
      raise _unknown_phase(arg, phase, config)
    entries = config.hooks[phase]
    if not 0 <= index < len(entries):
      raise flags.Error(
          f'{arg}: index {index} is out of range: config.hooks.{phase} has '
          f'{len(entries)} entries' + (f' (0..{len(entries) - 1})'
                                       if entries else '')
          + '; add one with --hook=PHASE:NAME.')
    entry, field = entries[index], match['field']
    value = _parse_value(match['value'], entry.get(field), arg)
    if isinstance(entry, ml_collections.ConfigDict):
      with entry.unlocked():
        entry[field] = value
    else:
      entry[field] = value


def apply_hook_flags(config: Any, hook_flags: Sequence[str],
                     overrides: Sequence[str]) -> None:
  """Checks the hook lists and applies --hook and the indexed overrides.

  Args:
    config: the config as config_flags parsed it (`--config.hooks.PHASE=`
      replacements applied).
    hook_flags: the values of --hook, in order.
    overrides: the `--config.hooks.PHASE[I].FIELD=VALUE` arguments.

  Raises:
    flags.Error: a phase's value is not a list of entries, or a bad --hook
      or override.
  """
  for phase in _phases(config):
    config.hooks[phase] = _hook_list(config.hooks[phase],
                                     f'--config.hooks.{phase}')
  for text in hook_flags:
    phase, entry = parse_hook_flag(text, config)
    config.hooks[phase] = [*config.hooks[phase], entry]
  apply_hook_overrides(config, overrides)


HELP = ('-h', '--help', '--helpshort', '--helpfull')


class HelpRequested(Exception):
  """`-h`/`--help` was given; the message is the help text (exit status 0)."""


def help_text(doc: str, values: flags.FlagValues) -> str:
  """A command's docstring, its flags and where the config keys are listed."""
  return f'{doc.strip()}\n\n{DOCS}\n\nflags:\n{values.get_help()}\n'


def parse_flags(argv: Sequence[str], doc: str = '') -> flags.FlagValues:
  """Parses argv into fresh flag values (so main can run many times in-process).

  Args:
    argv: the command line, program name first.
    doc: the command's docstring, for --help.

  Returns:
    The parsed flags: config (hook flags applied), workdir, hook and the
    multi-process settings.

  Raises:
    flags.Error: an unknown flag or config key, or a value of the wrong type.
    HelpRequested: `-h` or `--help` was given (the help text, built from
      `doc` and the flags).
  """
  hook_overrides = [a for a in argv if _HOOK_OVERRIDE.fullmatch(a)]
  argv = [a for a in argv if not _HOOK_OVERRIDE.fullmatch(a)]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file(
      'config', None, 'Training config file (configs/*.py); override any key '
      'with --config.KEY=VALUE.', flag_values=values, lock_config=True,
      sys_argv=argv)
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics '
                      'and summary.json.', flag_values=values)
  flags.DEFINE_multi_string('hook', [], HOOK_HELP, flag_values=values)
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
  try:
    values(argv)
  except (KeyError, AttributeError) as e:  # An unknown config key.
    while e.args and isinstance(e.args[0], Exception):
      e = e.args[0]  # ml_collections wraps the KeyError that says it.
    raise flags.Error('unknown config key '
                      + (str(e.args[0]) if e.args else str(e))) from None
  except flags.Error as e:
    if '.hooks.' not in str(e) or 'not supported' not in str(e):
      raise
    raise flags.Error(
        f'{e}\nThis config declares its hook lists as lists; declare them as '
        'config_dict.FieldReference([], field_type=object), as '
        'configs/default.py does, or append entries with --hook.') from None
  if values.config is None:
    raise flags.Error('--config is required, e.g. --config=configs/default.py')
  apply_hook_flags(values.config, values.hook, hook_overrides)
  return values


# Third-party log lines that tell the user nothing, matched narrowly: the
# module that logs them and the start of the message.
_UNINFORMATIVE = (
    # orbax, each time the trainer opens its checkpoints to read them.
    (f'{os.sep}orbax{os.sep}checkpoint{os.sep}checkpoint_manager.py',
     'CheckpointManagerOptions.read_only=True, setting'),
    (f'{os.sep}orbax{os.sep}checkpoint{os.sep}checkpoint_manager.py',
     'Given directory is read only'),
    # jax, on every machine without the TPU library.
    (f'{os.sep}jax{os.sep}_src{os.sep}xla_bridge.py',
     "Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so"),
)


class _QuietLibraries(std_logging.Filter):
  """Drops orbax's INFO lines (dozens per checkpoint) and `_UNINFORMATIVE`."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    path = record.pathname
    if f'{os.sep}orbax{os.sep}' in path and (
        record.levelno < logging.converter.STANDARD_WARNING):
      return False
    return not any(path.endswith(module)
                   and record.getMessage().startswith(prefix)
                   for module, prefix in _UNINFORMATIVE)


def setup_logging(verbosity: int = logging.INFO) -> None:
  """absl logging on stderr, without the libraries' uninformative lines.

  The filter sits on absl's handler, which only the entry points install:
  other handlers (a test's, an embedding program's) still get every record.

  Args:
    verbosity: the absl level to log at (e.g. logging.WARNING).
  """
  flags.FLAGS.mark_as_parsed()  # Our flags live in their own FlagValues.
  logging.use_absl_handler()
  logging.set_verbosity(verbosity)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())
