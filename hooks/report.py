"""What surgery did: one ``Action`` list per flat key, and donor provenance.

A ``Report`` is the return value of ``hooks.apply`` and ``hooks.restore``:
per param and optimizer slot, what happened to it (copied, resized,
reinitialized, ...), and per donor that was opened, where it was and a hash
of exactly what was read from it. An application may add notes, lines that
say what only it knows (e.g. what a head's labels mean).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hooks import flat as flat_lib

__all__ = ['ACTIONS', 'Action', 'Report']

# What can happen to a param or an optimizer slot, in table order.
ACTIONS = (
    'copied',
    'renamed',
    'migrated',
    'resized',
    'relabelled',
    'reinitialized',
    'reset',
    'frozen',
    'modified',  # A custom hook's own edit (e.g. scaled).
    'unchanged',
)
_NEEDS_SOURCE = ('copied', 'renamed', 'migrated')


@dataclasses.dataclass(frozen=True)
class Action:
  """One thing a hook did to one key.

  Attributes:
    action: One of ``ACTIONS``.
    source: The key it came from (copied: the donor key; renamed, migrated).
    from_shape: The shape before a resize.
    shape: The shape after a resize.
    detail: Free text, e.g. which label went to which column.
    hook: The name of the hook that did it (set by the pipeline).
  """

  action: str
  source: str | None = None
  from_shape: tuple[int, ...] | None = None
  shape: tuple[int, ...] | None = None
  detail: str | None = None
  hook: str | None = None

  def describe(self) -> str:
    """Returns e.g. ``'resized (256, 5) -> (256, 10)'``."""
    if self.action == 'copied':
      text = f'copied from donor key {self.source}'
    elif self.action in ('renamed', 'migrated'):
      text = f'{self.action} from {self.source}'
    elif self.action == 'resized':
      text = f'resized {self.from_shape} -> {self.shape}'
    else:
      text = self.action
    return f'{text} ({self.detail})' if self.detail else text

  def to_json(self) -> dict[str, Any]:
    out = {'action': self.action, 'description': self.describe()}
    for name in ('source', 'detail', 'hook'):
      if getattr(self, name) is not None:
        out[name] = getattr(self, name)
    for name in ('from_shape', 'shape'):
      if getattr(self, name) is not None:
        out[name] = list(getattr(self, name))
    return out


_UNCHANGED = Action('unchanged')


def _shape(leaf: Any) -> tuple[int, ...]:
  shape = getattr(leaf, 'shape', None)
  return tuple(shape) if shape is not None else tuple(np.shape(leaf))


class Report:
  """Collects what hooks did, per flat key, and where donors came from."""

  def __init__(self) -> None:
    self._actions: dict[str, list[Action]] = {}
    self._shapes: dict[str, tuple[int, ...]] = {}
    self._sources: list[dict[str, Any]] = []
    self._notes: list[str] = []

  def record(
      self,
      key: str,
      action: str,
      *,
      source: str | None = None,
      from_shape: Sequence[int] | None = None,
      shape: Sequence[int] | None = None,
      detail: str | None = None,
  ) -> None:
    """Records that ``action`` happened to ``key``.

    Args:
      key: The flat key, in the result state.
      action: One of ``ACTIONS``.
      source: For copied/renamed/migrated, the key the value came from.
      from_shape: For resized, the old shape.
      shape: The key's shape in the result (required for resized).
      detail: Free text shown after the action, e.g. label placement.

    Raises:
      ValueError: If the action is unknown or lacks its details.
    """
    if action not in ACTIONS:
      raise ValueError(f'Unknown report action {action!r}; use one of {ACTIONS}.')
    if action in _NEEDS_SOURCE and source is None:
      raise ValueError(f'Report action {action!r} for {key!r} needs source=.')
    if action == 'resized' and (from_shape is None or shape is None):
      raise ValueError(
          f'Report action "resized" for {key!r} needs from_shape= and shape=.'
      )
    self._actions.setdefault(key, []).append(
        Action(
            action,
            source=source,
            from_shape=None if from_shape is None else tuple(from_shape),
            shape=None if shape is None else tuple(shape),
            detail=detail,
        )
    )
    if shape is not None:
      self._shapes[key] = tuple(shape)

  def add_source(self, provenance: Mapping[str, Any]) -> None:
    """Records a donor or checkpoint that was read (``reader.provenance()``)."""
    self._sources.append(dict(provenance))

  @property
  def sources(self) -> list[dict[str, Any]]:
    """Provenance of every donor opened: path, form, step, item, sha256."""
    return [dict(s) for s in self._sources]

  def note(self, text: str) -> None:
    """Adds a line for the end of the table and to the JSON's ``notes``."""
    self._notes.append(str(text))

  @property
  def notes(self) -> list[str]:
    """The lines added with ``note``, in order."""
    return list(self._notes)

  def merge(self, other: Report, *, hook: str | None = None) -> None:
    """Appends ``other``'s actions (tagged with the hook's name) and sources."""
    for key, actions in other._actions.items():  # pylint: disable=protected-access
      if hook:
        actions = [dataclasses.replace(a, hook=hook) for a in actions]
      self._actions.setdefault(key, []).extend(actions)
    self._shapes.update(other._shapes)  # pylint: disable=protected-access
    self._sources.extend(other._sources)  # pylint: disable=protected-access
    self._notes.extend(other._notes)  # pylint: disable=protected-access

  def finalize(self, flat: Mapping[str, Any]) -> None:
    """Takes shapes from the result and marks untouched params and slots.

    Args:
      flat: The flat state after the last hook.
    """
    actions, shapes = self._actions, self._shapes
    for key in actions:  # Every param is in the index below: no pass over all.
      if key in flat:
        shapes[key] = _shape(flat[key])
    for param, slots in flat_lib.slot_index(flat).items():
      for key in (param, *slots):
        if key not in actions:
          actions[key] = [_UNCHANGED]
          shapes[key] = _shape(flat[key])

  def actions(self, key: str) -> list[Action]:
    """Returns the actions recorded for ``key`` (empty if none)."""
    return list(self._actions.get(key, ()))

  def keys(self) -> list[str]:
    """Returns the keys with recorded actions, sorted."""
    return sorted(self._actions)

  def totals(self) -> dict[str, int]:
    """Returns action -> number of times recorded, in ``ACTIONS`` order."""
    counts = collections.Counter(
        a.action for actions in self._actions.values() for a in actions
    )
    return {a: counts[a] for a in ACTIONS if counts[a]}

  def changed(self) -> bool:
    """Whether any key has an action other than ``'unchanged'``."""
    return any(a.action != 'unchanged'
               for actions in self._actions.values() for a in actions)

  def table(self) -> str:
    """An aligned table (key, shape, action) and totals, or one line when
    nothing changed; then the sources and the notes."""
    if self.changed():
      lines = self._rows()
    else:
      lines = [f'nothing changed: all {len(self._actions)} params and '
               'optimizer slots unchanged']
    for source in self._sources:
      step, sha = source.get('step'), source.get('sha256')  # No read: None.
      lines.append(f'source: {source.get("path")} ({source.get("form")}'
                   + (f', step {step}' if step is not None else '')
                   + (f'), sha256 {sha}' if sha else '), nothing read'))
    lines.extend(self._notes)
    return '\n'.join(lines)

  def _rows(self) -> list[str]:
    rows = [('key', 'shape', 'action')]
    for key in self.keys():
      shape = str(self._shapes[key]) if key in self._shapes else '-'
      rows.append(
          (key, shape, '; '.join(a.describe() for a in self._actions[key]))
      )
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [
        f'{k:<{widths[0]}}  {s:<{widths[1]}}  {a}'.rstrip() for k, s, a in rows
    ]
    totals = ', '.join(f'{a}: {n}' for a, n in self.totals().items())
    lines.append(f'totals: {totals or "none"}')
    return lines

  def to_json(self) -> dict[str, Any]:
    """Returns a JSON-serializable dict, e.g. for ``surgery_report.json``."""
    return {
        'keys': {
            key: {
                'shape': list(self._shapes[key]) if key in self._shapes else None,
                'actions': [a.to_json() for a in self._actions[key]],
            }
            for key in self.keys()
        },
        'totals': self.totals(),
        'sources': self.sources,
        'notes': self.notes,
    }
