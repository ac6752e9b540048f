"""Pairing the entries of a labelled axis, and saying which label went where.

``resolve`` turns a ``hooks.labels.LabelSpec`` and one tensor's axis sizes
into a ``Pairing`` (target index <- source index, by label); ``describe``
puts it in words for the report, calling a 2-D kernel's last axis columns
and its first axis rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from hooks import labels as labels_lib

__all__ = ['Pairing', 'axis_index', 'describe', 'labels_text', 'pairs',
           'resolve']

Label = labels_lib.Label
_MAX_RUNS = 6


@dataclasses.dataclass(frozen=True)
class Pairing:
  """Target entries and the source entries they take, in target order."""

  target_index: tuple[int, ...]
  source_index: tuple[int, ...]
  target_labels: tuple[Label, ...]
  source_labels: tuple[Label, ...]

  @property
  def is_identity(self) -> bool:
    """Whether every entry keeps its place and nothing is added or dropped."""
    n = len(self.target_labels)
    return (len(self.source_labels) == n
            and self.target_index == self.source_index == tuple(range(n)))


def pairs(target: Sequence[Label], source: Sequence[Label],
          label_map: Iterable[tuple[Label, Label]] | None = None
          ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Pairs target indices with the source indices of the same label.

  Args:
    target: The label of each target entry.
    source: The label of each source entry.
    label_map: (target label, source label) pairs; by default each target
      label takes the source entry of the same label, when there is one.
      Labels must be in their lists (``resolve`` checks).

  Returns:
    (target indices, source indices), in target order.
  """
  where = {label: i for i, label in enumerate(source)}
  if label_map is None:
    found = [(i, where[t]) for i, t in enumerate(target) if t in where]
  else:
    at = {label: i for i, label in enumerate(target)}
    found = sorted((at[t], where[s]) for t, s in label_map)
  return tuple(p[0] for p in found), tuple(p[1] for p in found)


def resolve(s: labels_lib.LabelSpec, target_size: int, source_size: int, *,
            key: str, source_key: str | None = None, source: str = 'donor'
            ) -> Pairing:
  """Pairs the entries of one tensor's labelled axis.

  Args:
    s: The spec.
    target_size: The target's size on the axis.
    source_size: The source's size on the axis.
    key: The target key, for messages.
    source_key: The source key, for messages (default ``key``).
    source: What the source is called, for messages.

  Returns:
    The pairing.

  Raises:
    ValueError: If a label list does not fit the axis or the map names a
      label that is not there.
  """
  target = s.target if s.target is not None else tuple(range(target_size))
  labels = s.source if s.source is not None else tuple(range(source_size))
  for side, given, size, name in (('target', target, target_size, key),
                                  (source, labels, source_size,
                                   source_key or key)):
    if len(given) != size:
      raise ValueError(
          f'{len(given)} {side} labels but the {side} {name} has {size} '
          f'entries on axis {s.axis} (layers={s.layers!r}); give one label '
          'per entry.')
  if s.label_map is not None:
    bad_t = [t for t, _ in s.label_map if t not in target]
    bad_s = [v for _, v in s.label_map if v not in labels]
    if bad_t or bad_s:
      raise ValueError(
          f'map {dict(s.label_map)} for {key}: ' + '; '.join(
              f'{what} label(s) {bad} not in {labels_text(known)}'
              for what, bad, known in (('target', bad_t, target),
                                       (source, bad_s, labels)) if bad) + '.')
  t_index, s_index = pairs(target, labels, s.label_map)
  return Pairing(t_index, s_index, tuple(target), tuple(labels))


def labels_text(labels: Sequence[Label]) -> str:
  """Returns e.g. ``'the labels [0, 1, 2, 3, 4]'``, long lists shortened."""
  if len(labels) <= 10:
    return f'the labels {list(labels)}'
  return f'the {len(labels)} labels [{", ".join(map(repr, labels[:10]))}, ...]'


def _axis_names(rank: int, axis: int) -> tuple[str, str]:
  axis %= max(rank, 1)
  if rank == 1:
    return 'entries', 'entry'
  if rank == 2:
    return ('rows', 'row') if axis == 0 else ('columns', 'column')
  return f'axis-{axis} entries', f'axis-{axis} entry'


def _runs(index: Sequence[int], other: Sequence[int] | None = None
          ) -> list[tuple[int, int, int, int]]:
  """Groups indices (and paired ones) into (first, last, other first, last)."""
  other = index if other is None else other
  runs: list[list[int]] = []
  for i, j in zip(index, other):
    if runs and i == runs[-1][1] + 1 and j == runs[-1][3] + 1:
      runs[-1][1], runs[-1][3] = i, j
    else:
      runs.append([i, i, j, j])
  return [tuple(r) for r in runs]


def _span(a: int, b: int) -> str:
  return str(a) if a == b else f'{a}..{b}'


def _join(parts: list[str]) -> str:
  if len(parts) > _MAX_RUNS:
    parts = parts[:_MAX_RUNS] + [f'... ({len(parts)} runs)']
  return ', '.join(parts)


def describe(p: Pairing, rank: int, axis: int, *, new: str = 'fresh',
             source: str = 'donor') -> str:
  """Says which label went where, e.g. for a ten-class kernel from five:

  ``'columns by label: 0..4 <- donor columns 0..4; new: 5..9 (fresh)'``

  Args:
    p: The pairing.
    rank: The tensor's rank (a 2-D kernel's last axis has columns, axis 0
      rows; a 1-D tensor has entries).
    axis: The labelled axis.
    new: How new entries are filled.
    source: What the source is called.
  """
  plural, singular = _axis_names(rank, axis)
  default = p.target_labels == tuple(range(len(p.target_labels)))

  def labelled(a: int, b: int) -> str:
    if default:
      return _span(a, b)
    first, last = p.target_labels[a], p.target_labels[b]
    return _span(a, b) + (f' ({first!r})' if a == b else
                          f' ({first!r}..{last!r})')

  moved = [f'{labelled(a, b)} <- {source} '
           f'{singular if c == d else plural} {_span(c, d)}'
           for a, b, c, d in _runs(p.target_index, p.source_index)]
  parts = [f'{plural} by label: ' + (_join(moved) or 'none shared')]
  kept = set(p.target_index)
  fresh = [i for i in range(len(p.target_labels)) if i not in kept]
  if fresh:
    parts.append('new: ' + _join([labelled(a, b) for a, b, _, _ in
                                  _runs(fresh)]) + f' ({new})')
  used = set(p.source_index)
  dropped = [i for i in range(len(p.source_labels)) if i not in used]
  if dropped:
    parts.append(f'dropped: {source} '
                 f'{singular if len(dropped) == 1 else plural} ' +
                 _join([_span(a, b) for a, b, _, _ in _runs(dropped)]))
  return '; '.join(parts)


def axis_index(s: labels_lib.LabelSpec, target_shape: tuple[int, ...],
               source_shape: tuple[int, ...], *, key: str,
               source_key: str | None = None, new: str = 'fresh',
               source: str = 'donor') -> tuple[dict[int, Any], str]:
  """Pairs one tensor's labelled axis, for ``transfer.plan(labelled=...)``.

  Returns:
    ({axis: (target indices, source indices)}, the ``describe`` text).

  Raises:
    ValueError: If the shapes have no such axis, or as ``resolve``.
  """
  rank = len(target_shape)
  if len(source_shape) != rank or not -rank <= s.axis < rank:
    raise ValueError(
        f'{key} {target_shape} and {source} {source_key or key} '
        f'{source_shape} have no axis {s.axis} in common to pair by label '
        f'(layers={s.layers!r}).')
  p = resolve(s, target_shape[s.axis], source_shape[s.axis], key=key,
              source_key=source_key, source=source)
  return ({s.axis: (p.target_index, p.source_index)},
          describe(p, rank, s.axis, new=new, source=source))
