"""Pure train and eval steps. The caller jits them (state donated)."""


from typing import Any

from clu import metrics
import flax
from flax.training import train_state
import jax
import optax

import hooks

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Accuracy


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Accuracy


def _per_example_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(state: train_state.TrainState,
               batch: Batch) -> tuple[train_state.TrainState, TrainMetrics]:
  """One optimizer step on `batch`.

  Frozen params (an optimizer from `hooks.freeze`) are not differentiated:
  their layers run as inference, and their (unused) gradients are zeros.

  Args:
    state: the train state (donated by the caller's jit).
    batch: {'image': [B, 28, 28, 1], 'label': [B]}.

  Returns:
    The new state and this step's metrics, on device.
  """
  def loss_fn(params: Any) -> tuple[jax.Array, jax.Array]:
    params = hooks.stop_frozen_gradients(params, state.tx)
    logits = state.apply_fn({'params': params}, batch['image'])
    return _per_example_loss(logits, batch['label']).mean(), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  state = state.apply_gradients(grads=grads)
  step_metrics = TrainMetrics.single_from_model_output(
      loss=loss, logits=logits, labels=batch['label'])
  return state, step_metrics


def eval_step(state: train_state.TrainState, batch: Batch) -> EvalMetrics:
  """Metrics of one padded eval batch; rows with mask False do not count.

  Args:
    state: the train state.
    batch: {'image', 'label', 'mask'}.

  Returns:
    The batch's metrics, on device.
  """
  logits = state.apply_fn({'params': state.params}, batch['image'])
  return EvalMetrics.single_from_model_output(
      loss=_per_example_loss(logits, batch['label']), logits=logits,
      labels=batch['label'], mask=batch['mask'])


def predict(state: train_state.TrainState, images: jax.Array) -> jax.Array:
  """Predicted labels for `images`."""
  return state.apply_fn({'params': state.params}, images).argmax(-1)
