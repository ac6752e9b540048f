"""The optimizer a config asks for, as one optax GradientTransformation.

Every optimizer is wrapped in `optax.inject_hyperparams` with the learning rate
as a schedule of the optimizer's own step count, so the schedule of the current
config always wins over what a restored optimizer state holds. Adam and AdamW
come from `hooks.optim`, whose bias correction counts steps per tensor (and per
entry along an axis surgery edits): slots that surgery creates fresh get no
bias-correction kick, and the state is about twice the params.
"""

from __future__ import annotations

import ml_collections
import optax

from hooks import optim as hooks_optim

OPTIMIZERS = ('sgd', 'adam', 'adamw')
SCHEDULES = ('constant', 'cosine', 'warmup_cosine')


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           num_train_steps: int) -> optax.Schedule:
  """Returns the learning rate as a function of the optimizer's step count.

  Args:
    config: the `optimizer` part of the run config.
    num_train_steps: total steps of the run (the decay horizon).

  Returns:
    An optax schedule.
  """
  peak = config.learning_rate
  if config.schedule == 'constant':
    return optax.constant_schedule(peak)
  if config.schedule == 'cosine':
    return optax.cosine_decay_schedule(peak, decay_steps=num_train_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=config.warmup_steps,
      decay_steps=num_train_steps)


def create(config: ml_collections.ConfigDict,
           num_train_steps: int) -> optax.GradientTransformation:
  """Builds the optimizer named by `config.name`.

  Args:
    config: the `optimizer` part of the run config (validated).
    num_train_steps: total steps of the run.

  Returns:
    The optax transformation, hyperparameters injected into its state.
  """
  schedule = learning_rate_schedule(config, num_train_steps)
  if config.name == 'sgd':
    return optax.inject_hyperparams(
        optax.sgd, static_args=('momentum', 'nesterov'))(
            learning_rate=schedule, momentum=config.momentum or None,
            nesterov=config.nesterov)
  if config.name == 'adam':
    return optax.inject_hyperparams(hooks_optim.adam)(
        learning_rate=schedule, b1=config.b1, b2=config.b2, eps=config.eps)
  return optax.inject_hyperparams(hooks_optim.adamw)(
      learning_rate=schedule, b1=config.b1, b2=config.b2, eps=config.eps,
      weight_decay=config.weight_decay)
