"""Checkpoints a run reads: each path opened once, with its provenance."""

from __future__ import annotations

import os
from typing import Any

from hooks import donors
from hooks.readers import DonorReader

__all__ = ['Sources']


class Sources:
  """Opens each checkpoint once per run, and says what was read from it.

  Pass one ``Sources`` to several calls (or open a donor with it before the
  run, e.g. to read its metadata) and each path is still opened once.
  """

  def __init__(self) -> None:
    self._readers: dict[tuple[str, Any, Any], DonorReader] = {}

  def open(self, path: str | os.PathLike[str], *, item: str | None = None,
           step: int | None = None) -> DonorReader:
    """Returns the reader of ``path``, opening it on first use.

    Args:
      path: A checkpoint in any form ``hooks.open_donor`` reads.
      item: The CheckpointManager item to read, when a step has several.
      step: The step of a CheckpointManager root; default the latest.

    Returns:
      The reader (the same object for the same arguments).

    Raises:
      DonorError: If nothing readable is at ``path``.
    """
    key = (os.path.abspath(os.path.expanduser(os.fspath(path))), item, step)
    if key not in self._readers:
      self._readers[key] = donors.open_donor(key[0], item=item, step=step)
    return self._readers[key]

  def readers(self) -> list[DonorReader]:
    """Returns the readers opened so far, in opening order."""
    return list(self._readers.values())
