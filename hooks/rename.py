"""Hook ``rename``: rename params and, with them, their optimizer slots."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from hooks import api
from hooks import registry
from hooks import validation

_PARAMS = 'params/'
_OPT_STATE = 'opt_state/'


def _rules(rules: Sequence[Sequence[str]]) -> list[tuple[str, str]]:
  if isinstance(rules, str) or not isinstance(rules, Sequence):
    raise ValueError(
        f'rename: rules must be a list of (regex, replacement) pairs, got '
        f"{rules!r}; e.g. [('Dense_9/(.*)', r'Dense_1/\\1')]."
    )
  out = []
  for rule in rules:
    if isinstance(rule, str) or len(rule) != 2:
      raise ValueError(
          f'rename: rule {rule!r} must be a (regex, replacement) pair, e.g. '
          r"('Dense_9/(.*)', 'Dense_1/\1')."
      )
    out.append((str(rule[0]), str(rule[1])))
  validation.match_keys([p for p, _ in out], [], allow_empty=True)  # Regexes.
  return out


def _owner(key: str, params: Mapping[str, str]) -> str | None:
  """The param path an ``opt_state/`` key ends with (the longest), if any."""
  parts = key.split('/')
  for start in range(2, len(parts)):
    suffix = '/'.join(parts[start:])
    if suffix in params:
      return suffix
  return None


def _variables(flat: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
  """Model variables (every key but opt_state/ and step) -> (collection, path)."""
  out = {}
  for key in flat:
    collection, _, path = key.partition('/')
    if path and key + '/' != _OPT_STATE and not key.startswith(_OPT_STATE):
      out[key] = (collection, path)
  return out


@registry.register('rename')
def rename(
    rules: Sequence[tuple[str, str]],
    allow_unmatched: bool = False,
) -> api.HookFn:
  """Renames variable paths in every collection and in their slot keys.

  A rule ``(regex, replacement)`` matches a variable's path inside its
  collection (``Dense_9/kernel`` of ``params/Dense_9/kernel``;
  ``re.fullmatch``; the first matching rule wins) and gives its new path
  (``re.Match.expand``: ``\\1`` groups). ``<collection>/<p>`` becomes
  ``<collection>/<new>`` in every collection (``params``, ``batch_stats``,
  ...), and every ``opt_state/.../<p>`` key of a param (a key ending with
  the param's path, whatever its shape, so factored slots move too) becomes
  ``opt_state/.../<new>``. Other keys stay. Keys keep their order.

  Args:
    rules: ``(regex, replacement)`` pairs, e.g.
      ``[('Dense_9/(.*)', r'Dense_1/\\1')]``.
    allow_unmatched: Whether a rule may match no param.

  Returns:
    The hook function.

  Raises:
    ValueError: If a rule is malformed; when the hook runs, if a rule
      matches no param (unless ``allow_unmatched``) or a new key collides
      with another key.
  """
  parsed = _rules(rules)
  compiled = [(re.compile(p), r) for p, r in parsed]

  def hook_fn(flat: dict, ctx: api.Context) -> dict:
    params = {k[len(_PARAMS):]: k for k in flat if k.startswith(_PARAMS)}
    variables = _variables(flat)
    validation.match_keys(
        [p for p, _ in parsed], sorted({p for _, p in variables.values()}),
        allow_empty=allow_unmatched)
    new_path = {}
    for _, path in variables.values():
      for regex, replacement in compiled:
        match = regex.fullmatch(path)
        if match:
          new = match.expand(replacement)
          if new != path:
            new_path[path] = new
          break
    moves: dict[str, str] = {}
    for key in flat:
      if key in variables and variables[key][1] in new_path:
        collection, path = variables[key]
        moves[key] = f'{collection}/{new_path[path]}'
      elif key.startswith(_OPT_STATE):
        owner = _owner(key, params)
        if owner in new_path:
          moves[key] = key[: -len(owner)] + new_path[owner]
    targets: dict[str, list[str]] = {}
    for old, new in moves.items():
      targets.setdefault(new, []).append(old)
    collisions = [
        f'  {new} <- {olds}'
        + ('' if len(olds) > 1 else ' (already a key that is not renamed)')
        for new, olds in targets.items()
        if len(olds) > 1 or (new in flat and new not in moves)
    ]
    if collisions:
      raise ValueError(
          f'rename: {len(collisions)} new key(s) collide with other keys:\n'
          + '\n'.join(collisions)
          + '\n  Fix: rename the existing keys too, or reinitialize/drop '
          'them with another hook first.'
      )
    out: dict[str, Any] = {}
    for key, leaf in flat.items():
      new = moves.get(key, key)
      out[new] = leaf
      if new != key:
        ctx.report.record(new, 'renamed', source=key)
    return out

  return hook_fn
