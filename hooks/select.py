"""What the copy pieces take from a donor: selection, renames, label specs.

``options`` checks the parameters ``copy_params`` and ``copy_slots`` share
(no I/O). ``donor_keys`` picks the target's model variables (every key
outside ``opt_state/`` and ``step``) by the path inside their collection, so
``'Conv_0/.*'`` selects ``params/Conv_0/*`` and ``batch_stats/Conv_0/*``,
and gives each its donor key (rename rules, the donor's layout), gathering
every problem with close matches.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from hooks import api
from hooks import labels as labels_lib
from hooks import nnx_donor
from hooks import validation

__all__ = ['Options', 'check_donor', 'choice', 'donor_keys', 'donor_prefix',
           'model_keys', 'nnx_reads', 'open_source', 'options', 'split']

SHAPE_POLICIES = ('error', 'skip', 'overlap')
DTYPE_POLICIES = ('error', 'cast')


def choice(hook: str, name: str, value: Any, allowed: Sequence[str]) -> str:
  """Returns ``value`` if it is one of ``allowed``, else raises ValueError."""
  if value not in allowed:
    raise ValueError(f'{hook}: {name}={value!r} is not one of {list(allowed)}.')
  return value


def open_source(ctx: api.Context, donor: str, item: str | None,
                donor_step: int | None, opts: Options | None = None
                ) -> api.DonorReader:
  """The run's reader of ``donor`` (opened once per run by ``ctx.source``);
  an ``nnx.state`` checkpoint under the target's names (``nnx_reads``).

  Raises:
    DonorError: If the donor cannot be read, or the target reads one NNX
      variable into two collections.
  """
  kwargs = {k: v for k, v in (('item', item), ('step', donor_step))
            if v is not None}
  reader = ctx.source(donor, **kwargs)
  if reader.form != nnx_donor.FORM:
    return reader
  return nnx_donor.view(reader, nnx_reads(ctx.expected, opts))


def nnx_reads(expected: Mapping[str, Any], opts: Options | None = None
              ) -> dict[str, list[str]]:
  """Which target keys read each path of an ``nnx.state`` donor.

  Args:
    expected: The target's flat keys (to shapes).
    opts: A hook's selection and rename rules; default every model variable
      by its own path.

  Returns:
    Donor path (no collection) -> the target keys that read it.
  """
  keys = _select(expected, opts)[0] if opts else model_keys(expected)
  reads: dict[str, list[str]] = {}
  for key in keys:
    path = split(key)[1]
    if opts:
      path = _donor_path(path, opts)[0]
    reads.setdefault(path, []).append(key)
  return reads


def check_donor(hook: str, donor: Any, item: Any, donor_step: Any) -> str:
  """Checks a piece's donor arguments (no I/O); returns ``donor``."""
  if not isinstance(donor, str) or not donor:
    raise ValueError(f'{hook}: donor {donor!r} must be a checkpoint path.')
  if item is not None and not isinstance(item, str):
    raise ValueError(f'{hook}: item {item!r} must be the name of a '
                     "CheckpointManager item, e.g. 'default', or None.")
  if donor_step is not None and (isinstance(donor_step, bool) or
                                 not isinstance(donor_step, int)):
    raise ValueError(f'{hook}: donor_step {donor_step!r} must be a step '
                     'number, or None for the latest.')
  return donor


@dataclasses.dataclass(frozen=True)
class Options:
  """The checked selection parameters of a copy piece (see ``options``)."""

  hook: str
  include: tuple[str, ...]
  exclude: tuple[str, ...]
  rules: tuple[tuple[str, str, str], ...]  # (pattern, donor template, policy)
  labels: tuple[labels_lib.LabelSpec, ...]
  on_shape_mismatch: str
  on_dtype_mismatch: str


def _patterns(hook: str, name: str, value: Any) -> tuple[str, ...]:
  if isinstance(value, str):
    raise ValueError(f'{hook}: {name} must be a list of regexes, got the '
                     f'string {value!r}; write [{value!r}].')
  validation.match_keys(list(value), [], allow_empty=True)  # Checks regexes.
  return tuple(value)


def _rules(hook: str, rename: Any, default: str
           ) -> tuple[tuple[str, str, str], ...]:
  if isinstance(rename, (str, Mapping)):
    raise ValueError(f'{hook}: rename must be a list of (pattern, donor_path) '
                     f'pairs, got {rename!r}.')
  rules = []
  for rule in rename:
    if isinstance(rule, str) or len(rule) not in (2, 3):
      raise ValueError(
          f'{hook}: rename rule {tuple(rule)!r} must be (pattern, donor_path) '
          "or (pattern, donor_path, on_shape_mismatch), e.g. ('Dense_9/(.*)', "
          r"'Dense_1/\1').")
    policy = choice(hook, 'on_shape_mismatch',
                    rule[2] if len(rule) == 3 else default, SHAPE_POLICIES)
    _patterns(hook, 'rename', [rule[0]])
    rules.append((str(rule[0]), str(rule[1]), policy))
  return tuple(rules)


def options(hook: str, include: Sequence[str], exclude: Sequence[str],
            rename: Sequence[Sequence[str]],
            labels: Sequence[Mapping[str, Any]],
            on_shape_mismatch: str, on_dtype_mismatch: str) -> Options:
  """Checks a copy piece's selection parameters (no I/O).

  Raises:
    ValueError: Naming the bad parameter and the fix.
  """
  choice(hook, 'on_shape_mismatch', on_shape_mismatch, SHAPE_POLICIES)
  choice(hook, 'on_dtype_mismatch', on_dtype_mismatch, DTYPE_POLICIES)
  return Options(hook, _patterns(hook, 'include', include),
                 _patterns(hook, 'exclude', exclude),
                 _rules(hook, rename, on_shape_mismatch),
                 labels_lib.parse(labels, hook=hook), on_shape_mismatch,
                 on_dtype_mismatch)


def split(key: str) -> tuple[str, str]:
  """``'params/Conv_0/kernel'`` -> ``('params', 'Conv_0/kernel')``."""
  collection, _, path = key.partition('/')
  return (collection, path) if path else ('', key)


def model_keys(flat: Mapping[str, Any]) -> list[str]:
  """The model variables: every key outside ``opt_state/`` and ``step``."""
  return [k for k in flat if k != 'step' and not k.startswith('opt_state/')]


def donor_prefix(collection: str, structure: Mapping[str, Any]) -> str:
  """Where a donor keeps a collection: a TrainState or variables dict keeps
  it under its name, a ``flax.optim`` file keeps params under ``target/``,
  and bare variables (params alone, or ``nnx.state(model).to_pure_dict()``
  with its batch statistics beside them) have no prefix."""
  if not collection or any(k.startswith(f'{collection}/') for k in structure):
    return f'{collection}/' if collection else ''
  if any(k.startswith(('params/', 'target/')) for k in structure):
    return 'target/' if collection == 'params' else f'{collection}/'
  return ''


def _matches(patterns: Sequence[str], paths: list[str]) -> tuple[dict, list]:
  """``match_keys`` allowing none, and the error of each unmatched pattern."""
  matched = validation.match_keys(patterns, paths, allow_empty=True)
  errors, first = [], set(matched.values())  # These match: no second look.
  for pattern in (p for i, p in enumerate(patterns) if i not in first):
    try:
      validation.match_keys([pattern], paths)
    except ValueError as e:
      errors.append(str(e))
  return matched, errors


def _select(flat: Mapping[str, Any], opts: Options) -> tuple[list, list]:
  keys = model_keys(flat)
  paths = list(dict.fromkeys(split(k)[1] for k in keys))
  chosen, errors = _matches(opts.include, paths)
  dropped, more = _matches(opts.exclude, paths)
  kept = chosen.keys() - dropped.keys()
  return [k for k in keys if split(k)[1] in kept], errors + more


def _donor_path(path: str, opts: Options, used: list[bool] | None = None
                ) -> tuple[str, str]:
  for i, (pattern, template, policy) in enumerate(opts.rules):
    match = re.fullmatch(pattern, path)
    if match:
      if used is not None:
        used[i] = True
      return match.expand(template), policy
  return path, opts.on_shape_mismatch


def donor_keys(flat: Mapping[str, Any], structure: Mapping[str, Any],
               opts: Options) -> tuple[dict[str, tuple[str, str]], list[str]]:
  """Pairs each selected target variable with its donor key.

  Args:
    flat: The target flat state (concrete or abstract).
    structure: The donor's key -> ``ShapeDtypeStruct``.
    opts: The checked options.

  Returns:
    (target key -> (donor key, shape policy), every problem found: patterns
    or rules that match nothing, label specs that match no selected layer,
    donor keys that are not there).
  """
  selected, errors = _select(flat, opts)
  try:
    labels_lib.check_layers(opts.labels, [split(k)[1] for k in selected],
                            hook=opts.hook, what='selected layers')
  except ValueError as e:
    errors.append(str(e).removeprefix(f'{opts.hook}: '))
  used, out, missing = [False] * len(opts.rules), {}, []
  prefixes = {c: donor_prefix(c, structure)  # Once a collection, not a key.
              for c in {split(k)[0] for k in selected}}
  for key in selected:
    collection, path = split(key)
    donor_path, policy = _donor_path(path, opts, used)
    donor_key = prefixes[collection] + donor_path
    if donor_key in structure:
      out[key] = (donor_key, policy)
    else:
      close = difflib.get_close_matches(donor_key, list(structure), n=3,
                                        cutoff=0.5)
      missing.append(f'  {key} <- {donor_key}'
                     + (f'  (did you mean {close}?)' if close else ''))
  for (pattern, template, _), was_used in zip(opts.rules, used):
    if not was_used:
      errors.append(
          f'rename rule ({pattern!r}, {template!r}) matches none of the '
          f'{len(selected)} selected variables; rules match whole paths '
          'inside the collection (re.fullmatch).')
  if missing:
    errors.append(
        f'the donor lacks {len(missing)} key(s) for selected variables:\n'
        + '\n'.join(missing) + '\n  Fix: narrow include/exclude or add '
        'rename rules.')
  return out, errors
