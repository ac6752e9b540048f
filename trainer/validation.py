"""Checks a run config once, up front, before anything is read or written."""

from __future__ import annotations

from typing import Any

import ml_collections

from trainer import data
from trainer import models
from trainer import optimizers
from trainer.errors import ConfigError

PROGRESS_BAR = ('auto', 'on', 'off')


def _require(ok: bool, field: str, value: Any, allowed: str) -> None:
  if not ok:
    raise ConfigError(f'config.{field}={value!r} is not allowed: {allowed}.')


def _positive_int(config: ml_collections.ConfigDict, field: str) -> None:
  value = config
  for part in field.split('.'):
    value = value[part]
  _require(isinstance(value, int) and not isinstance(value, bool)
           and value > 0, field, value, 'use an integer > 0')


def num_classes(config: ml_collections.ConfigDict) -> int:
  """The model's class count: len(config.classes)."""
  return len(config.classes)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first field whose value is not allowed.

  Args:
    config: the resolved run config.

  Raises:
    ConfigError: with the field, its value and what is allowed.
  """
  _require(config.data_source in data.SOURCES, 'data_source',
           config.data_source, f'use one of {list(data.SOURCES)}')
  classes = tuple(config.classes)
  _require(all(isinstance(c, int) and 0 <= c <= 9 for c in classes),
           'classes', classes, 'digit labels must be integers in 0..9')
  _require(len(set(classes)) == len(classes), 'classes', classes,
           'each digit may appear once')
  _require(len(classes) >= 2, 'classes', classes, 'name at least two digits')
  _require(config.model.api in models.APIS, 'model.api', config.model.api,
           f'use one of {list(models.APIS)}')
  registered = models.NNX_MODELS if config.model.api == 'nnx' else models.MODELS
  _require(config.model.name in registered, 'model.name', config.model.name,
           f'use one of {sorted(registered)} (model.api={config.model.api!r})')
  if config.model.num_classes is not None:
    _require(config.model.num_classes == len(classes), 'model.num_classes',
             config.model.num_classes,
             f'config.classes names {len(classes)} digits {classes}; leave '
             f'model.num_classes unset or set it to {len(classes)}')
  _validate_optimizer(config.optimizer)
  for field in ('batch_size', 'eval_batch_size', 'log_every_steps',
                'eval_every_steps', 'checkpoint_every_steps',
                'keep_checkpoints'):
    _positive_int(config, field)
  _positive_int(config, 'num_epochs')
  if config.num_train_steps is not None:
    _positive_int(config, 'num_train_steps')
  _require(isinstance(config.seed, int) and config.seed >= 0, 'seed',
           config.seed, 'use an integer >= 0')
  _require(config.progress_bar in PROGRESS_BAR, 'progress_bar',
           config.progress_bar, f'use one of {list(PROGRESS_BAR)}')


def _validate_optimizer(opt: ml_collections.ConfigDict) -> None:
  _require(opt.name in optimizers.OPTIMIZERS, 'optimizer.name', opt.name,
           f'use one of {list(optimizers.OPTIMIZERS)}')
  _require(opt.schedule in optimizers.SCHEDULES, 'optimizer.schedule',
           opt.schedule, f'use one of {list(optimizers.SCHEDULES)}')
  _require(opt.learning_rate > 0, 'optimizer.learning_rate',
           opt.learning_rate, 'use a learning rate > 0')
  _require(opt.warmup_steps >= 0, 'optimizer.warmup_steps', opt.warmup_steps,
           'use a step count >= 0')
  _require(0 <= opt.momentum < 1, 'optimizer.momentum', opt.momentum,
           'use a value in [0, 1)')
  _require(0 <= opt.b1 < 1, 'optimizer.b1', opt.b1, 'use a value in [0, 1)')
  _require(0 <= opt.b2 < 1, 'optimizer.b2', opt.b2, 'use a value in [0, 1)')
  _require(opt.eps > 0, 'optimizer.eps', opt.eps, 'use a value > 0')
  _require(opt.weight_decay >= 0, 'optimizer.weight_decay', opt.weight_decay,
           'use a value >= 0')
