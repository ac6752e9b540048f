"""What a resumed run may change relative to the config stored with its checkpoint."""

from __future__ import annotations

import json
from typing import Any

import ml_collections

from trainer.errors import CheckpointError

# Fields that change how long or how visibly a run trains, not what it
# computes up to the step it resumes from. The learning rate and its schedule
# also belong here: they are recomputed from the current config at each step.
MUTABLE_FIELDS = frozenset({
    'num_epochs', 'num_train_steps', 'log_every_steps', 'eval_every_steps',
    'eval_batch_size', 'checkpoint_every_steps', 'keep_checkpoints',
    'progress_bar', 'compilation_cache_dir', 'data_dir', 'stop_on_nonfinite',
    'resume_step', 'mesh.axes', 'mesh.shape', 'partition_rules',
    'optimizer.learning_rate', 'optimizer.schedule', 'optimizer.warmup_steps',
    # How the steps compile: the low bits only (trainer.xla warns).
    'xla.cpu_convolutions', 'xla.compiler_options',
})


# Fields added after checkpoints were written without them, and the value
# such a checkpoint was trained with.
ADDED_FIELDS = {'model.api': 'linen', 'xla.cpu_convolutions': 'xla_default',
                'xla.compiler_options': None}


def to_json_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as plain JSON data (tuples become lists), as it is stored."""
  return json.loads(config.to_json())


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f'{prefix}{key}.'))
    return out
  return {prefix[:-1]: tree}


def diff(stored: dict[str, Any],
         current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
  """Fields whose values differ, as (dotted field, stored, current), sorted."""
  old, new = {**ADDED_FIELDS, **_flatten(stored)}, _flatten(current)
  missing = '<absent>'
  return sorted((key, old.get(key, missing), new.get(key, missing))
                for key in set(old) | set(new)
                if old.get(key, missing) != new.get(key, missing))


def _mutable(field: str) -> bool:
  # A dict-valued field's entries flatten to 'field.key'; they follow it.
  parts = field.split('.')
  return any('.'.join(parts[:i]) in MUTABLE_FIELDS
             for i in range(1, len(parts) + 1))


def check(stored: dict[str, Any], current: dict[str, Any],
          where: str) -> list[tuple[str, Any, Any]]:
  """Splits config changes into allowed ones (returned) and refused ones.

  Args:
    stored: the config stored with the checkpoint.
    current: the config of this invocation.
    where: the checkpoint, for the message.

  Returns:
    The allowed changes, (field, stored, current); the current values apply.

  Raises:
    CheckpointError: listing every field that may not change, with both
      values.
  """
  changes = diff(stored, current)
  refused = [c for c in changes if not _mutable(c[0])]
  if refused:
    lines = '\n'.join(f'  {field}: checkpoint has {old!r}, config has {new!r}'
                      for field, old, new in refused)
    raise CheckpointError(
        f'the checkpoint in {where} was written under a config that differs '
        f'in fields that may not change on resume:\n{lines}\nUse a new '
        f'--workdir for a different run, or restore these values.')
  return [c for c in changes if _mutable(c[0])]
