"""Matching flat keys with regexes: fully, in order, the first match wins."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence

__all__ = ['match_keys']

# How many close keys a did-you-mean lists.
_MAX_SUGGESTIONS = 3


def _suggest(key: str, candidates: Iterable[str]) -> list[str]:
  return difflib.get_close_matches(
      key, list(candidates), n=_MAX_SUGGESTIONS, cutoff=0.5
  )


def _compile(pattern: str) -> re.Pattern[str]:
  if not isinstance(pattern, str):
    raise ValueError(
        f'Key pattern {pattern!r} must be a string regex, got '
        f'{type(pattern).__name__}.'
    )
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(
        f'Key pattern {pattern!r} is not a valid regex ({e}); escape special '
        "characters, e.g. r'Dense_0/.*'."
    ) from e


def _no_match_message(pattern: str, keys: Sequence[str]) -> str:
  hint = ''
  close = [k for k in keys if re.fullmatch('.*/' + pattern, k)]
  if close:
    hint = (
        ' It matches the end of some keys: patterns match the whole key '
        '(re.fullmatch), so add the leading part or ".*/".'
    )
  else:
    close = _suggest(pattern, keys) or list(keys)
  return (
      f'Key pattern {pattern!r} matches none of the {len(keys)} keys.{hint} '
      f'Close keys: {close[:_MAX_SUGGESTIONS]}.'
  )


def match_keys(
    patterns: Sequence[str],
    keys: Iterable[str],
    *,
    allow_empty: bool = False,
) -> dict[str, int]:
  """Matches keys against regexes, fully and in order; the first match wins.

  Args:
    patterns: Regexes, matched with ``re.fullmatch``.
    keys: The keys to match.
    allow_empty: Whether a pattern may match no key at all.

  Returns:
    Matched key -> index of the first pattern that matches it, in the order of
    ``keys``. Keys no pattern matches are left out.

  Raises:
    ValueError: If a pattern is not a valid regex, or (unless ``allow_empty``)
      matches no key; the message names the pattern and lists close keys.
  """
  if isinstance(patterns, str):
    raise ValueError(
        f'patterns must be a list of regexes, got the string {patterns!r}; '
        f'write [{patterns!r}].'
    )
  compiled = [_compile(p) for p in patterns]
  keys = list(keys)
  matched: dict[str, int] = {}
  unused = set(range(len(compiled)))  # Patterns that matched no key yet.
  for key in keys:
    first = None
    for i, regex in enumerate(compiled):
      if regex.fullmatch(key):
        first = i
        break
    if first is None:
      continue
    matched[key] = first
    if not allow_empty and unused:
      # Past the first match, only whether an unused pattern matches is news.
      unused.discard(first)
      for j in [j for j in unused if j > first]:
        if compiled[j].fullmatch(key):
          unused.discard(j)
  if not allow_empty and unused:
    raise ValueError(_no_match_message(patterns[min(unused)], keys))
  return matched
