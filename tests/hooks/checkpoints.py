"""Donor checkpoints for the hooks tests, written like the trainer writes them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import flax.serialization
import orbax.checkpoint as ocp


def save_orbax(
    workdir: str,
    state: Any,
    *,
    step: int = 7,
    classes: Sequence[int] | None = (0, 1, 2, 3, 4),
) -> str:
  """Writes ``<workdir>/checkpoints/<step>/{state,config,meta}``; returns workdir.

  With ``classes=None`` the ``meta`` item is left out.
  """
  handlers = {
      'state': ocp.StandardCheckpointHandler(),
      'config': ocp.JsonCheckpointHandler(),
  }
  items = {
      'state': ocp.args.StandardSave(state),
      'config': ocp.args.JsonSave({'model': 'tiny'}),
  }
  if classes is not None:
    handlers['meta'] = ocp.JsonCheckpointHandler()
    items['meta'] = ocp.args.JsonSave(
        {'classes': list(classes), 'data_source': 'test', 'model': 'tiny'}
    )
  manager = ocp.CheckpointManager(
      os.path.join(workdir, 'checkpoints'), item_handlers=handlers
  )
  manager.save(step, args=ocp.args.Composite(**items))
  manager.wait_until_finished()
  manager.close()
  return workdir


def save_msgpack(path: str, tree: Any) -> str:
  """Writes ``tree`` as flax msgpack bytes; returns ``path``."""
  with open(path, 'wb') as f:
    f.write(flax.serialization.msgpack_serialize(tree))
  return path
