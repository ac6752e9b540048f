"""Pure train, eval and predict steps, jitted in one place: trainer/run.py.

One step for both Flax APIs: the state is a flax `TrainState` whose
`apply_fn` is a Linen module's `apply`, or for an NNX model
`models.NnxApply`, which merges the model's graph with the params inside the
trace (functional NNX). Under `jax.jit` both cost the same per call: the
CNN's two forms lower to the same program (tests/trainer/test_nnx.py,
benchmarks/nnx_step.py). `nnx.jit`, which splits and merges the model and
optimizer on the host at every call, is not used.
"""


from typing import Any, Callable

from clu import metrics
import flax
from flax.training import train_state
import jax
import jax.numpy as jnp
import optax

import hooks

Batch = dict[str, jax.Array]


# FirstNonFinite's value while every step was finite.
ALL_FINITE = int(jnp.iinfo(jnp.int32).max)


@flax.struct.dataclass
class FirstNonFinite(metrics.Metric):
  """The first step whose loss or gradient norm was NaN or infinite.

  Merged by minimum, so the running totals hold the earliest such step (or
  ALL_FINITE) without a host sync; the loop reads it when it reads metrics.
  """
  step: jax.Array

  @classmethod
  def from_model_output(cls, *, finite: jax.Array, step: jax.Array,
                        **_: Any) -> 'FirstNonFinite':
    return cls(step=jnp.where(finite, ALL_FINITE, step).astype(jnp.int32))

  @classmethod
  def empty(cls) -> 'FirstNonFinite':
    return cls(step=jnp.array(ALL_FINITE, jnp.int32))

  def merge(self, other: 'FirstNonFinite') -> 'FirstNonFinite':
    return type(self)(step=jnp.minimum(self.step, other.step))

  def compute(self) -> jax.Array:
    return self.step


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Accuracy
  first_nonfinite_step: FirstNonFinite


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Accuracy


def _per_example_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(state: train_state.TrainState, batch: Batch,
               check_finite: bool = True
               ) -> tuple[train_state.TrainState, TrainMetrics]:
  """One optimizer step on `batch`.

  Frozen params (an optimizer from `hooks.freeze`) are not differentiated:
  their layers run as inference, and their (unused) gradients are zeros.

  Args:
    state: the train state (donated by the caller's jit).
    batch: {'image': [B, 28, 28, 1], 'label': [B]}.
    check_finite: record this step in `first_nonfinite_step` when its loss
      or global gradient norm is NaN or infinite (False: the norm is not
      computed and the metric stays ALL_FINITE).

  Returns:
    The new state and this step's metrics, on device.
  """
  def loss_fn(params: Any) -> tuple[jax.Array, jax.Array]:
    params = hooks.stop_frozen_gradients(params, state.tx)
    logits = state.apply_fn({'params': params}, batch['image'])
    return _per_example_loss(logits, batch['label']).mean(), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  finite = (jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))
            if check_finite else jnp.bool_(True))
  # `step`: the step this update completes, as the loop counts steps.
  step_metrics = TrainMetrics.single_from_model_output(
      loss=loss, logits=logits, labels=batch['label'], finite=finite,
      step=state.step + 1)
  state = state.apply_gradients(grads=grads)
  return state, step_metrics


def _unconstrained(tree: Any) -> Any:
  return tree


def train_and_merge(state: train_state.TrainState, totals: TrainMetrics,
                    batch: Batch, check_finite: bool = True,
                    constrain: Callable[[Any], Any] = _unconstrained
                    ) -> tuple[train_state.TrainState, TrainMetrics]:
  """`train_step`, its metrics added to running totals in the same program.

  The loop's step: jitted with state and totals donated, it spares the
  per-step metric outputs and a merge dispatch per step, about 1 ms a step
  on a CPU (10% of a step with frozen convolutions; benchmarks/freeze.py).

  Args:
    state: the train state.
    totals: the metrics of the steps since the last read
      (`TrainMetrics.empty()` to start).
    batch: {'image': [B, 28, 28, 1], 'label': [B]}.
    check_finite: as `train_step`'s.
    constrain: holds each output leaf to its sharding (the run's
      `distributed.Topology.constrain`), as `out_shardings` would for a
      state of fixed structure.

  Returns:
    The new state and the totals with this step's metrics merged in.
  """
  state, metrics = train_step(state, batch, check_finite)
  return constrain(state), constrain(totals.merge(metrics))


def finite_leaves(tree: Any) -> Any:
  """Whether each leaf of `tree` holds only finite values (a bool per leaf)."""
  return jax.tree.map(lambda leaf: jnp.isfinite(leaf).all(), tree)


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
