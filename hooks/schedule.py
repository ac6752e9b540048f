"""Freeze schedules: which params are frozen from which step on."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import optax

from hooks.freeze import freeze
from hooks import validation

__all__ = ['FreezeSchedule']


def _step(value: Any) -> int:
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    step = int(value)
  elif isinstance(value, str) and value.isdigit():
    step = int(value)
  else:
    raise ValueError(
        f'Freeze schedule step {value!r} must be a non-negative integer (or a '
        "string of digits, e.g. '100')."
    )
  if step < 0:
    raise ValueError(f'Freeze schedule step {step} must be >= 0.')
  return step


def _patterns(step: int, value: Any) -> tuple[str, ...]:
  if isinstance(value, str) or not isinstance(value, Sequence):
    raise ValueError(
        f'Freeze schedule at step {step}: {value!r} must be a list of regexes, '
        "e.g. ['Conv_.*'] (or [] to train everything)."
    )
  validation.match_keys(value, [], allow_empty=True)  # Checks each regex.
  return tuple(value)


@dataclasses.dataclass(frozen=True)
class FreezeSchedule:
  """Which params are frozen from which step on.

  Attributes:
    phases: ``(step, patterns)`` pairs sorted by step; the patterns apply
      from that step until the next one. Before the first step nothing is
      frozen.
  """

  phases: tuple[tuple[int, tuple[str, ...]], ...] = ()

  @classmethod
  def parse(cls, schedule: Mapping[Any, Sequence[str]]) -> FreezeSchedule:
    """Parses ``{step: patterns}``, e.g. ``{0: ['Conv_.*'], 200: []}``.

    Args:
      schedule: Step (int or digit string, as config dicts need) -> regexes
        over param paths frozen from that step on.

    Returns:
      The schedule.

    Raises:
      ValueError: If a step is not a non-negative integer, two keys give the
        same step, or patterns are not a list of valid regexes.
    """
    phases: dict[int, tuple[str, ...]] = {}
    for key, value in schedule.items():
      step = _step(key)
      if step in phases:
        raise ValueError(
            f'Freeze schedule gives step {step} twice ({key!r}); keep one.'
        )
      phases[step] = _patterns(step, value)
    return cls(tuple(sorted(phases.items())))

  @property
  def boundaries(self) -> tuple[int, ...]:
    """The steps at which the frozen set changes."""
    return tuple(step for step, _ in self.phases)

  def phase_index(self, step: int) -> int:
    """Returns the index of the phase ``step`` is in (-1 before the first)."""
    index = -1
    for i, (start, _) in enumerate(self.phases):
      if step >= start:
        index = i
    return index

  def phase_at(self, step: int) -> tuple[str, ...]:
    """Returns the patterns frozen at ``step`` (empty: nothing frozen)."""
    index = self.phase_index(step)
    return self.phases[index][1] if index >= 0 else ()

  def tx_at(
      self, step: int, tx: optax.GradientTransformation, params: Any
  ) -> optax.GradientTransformation:
    """Returns ``freeze(tx, params, self.phase_at(step))``."""
    return freeze(tx, params, self.phase_at(step))


