"""Adam with a count per tensor, so surgery can make fresh slots.

``optax.scale_by_adam`` keeps one scalar ``count`` for bias correction. After
surgery gives some params fresh (zero) moments while the others carry on at
step ``t``, the fresh ones are bias-corrected as if they had ``t`` steps of
history, and their first update is up to ``sqrt(1 - b2) / (1 - b1)`` (about
3.16) times the learning rate. Here ``count`` is a tree like the params, one
more optimizer slot: each param's count is an ``int32`` of shape ``(1,) *
ndim`` that broadcasts against it, so a reset or reinitialized param has
count 0 and gets the usual first Adam step, never larger than the learning
rate. Surgery expands a count only along an axis it edits (``hooks.counts``:
a resized (256, 10) head has a (1, 10) count, its new columns at 0), so the
state is about twice the params, as optax's. Per-element counts (older
checkpoints) are counts too; ``compact_counts`` shrinks uniform ones.

With equal counts everywhere the math is that of ``optax.scale_by_adam``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hooks import counts as counts_lib
from hooks import slots

__all__ = ['ScaleByAdamState', 'adam', 'adamw', 'compact_counts',
           'scale_by_adam']


class ScaleByAdamState(NamedTuple):
  """State of ``scale_by_adam``: trees with the params' structure.

  ``mu`` and ``nu`` are shaped like the params; each leaf of ``count`` is an
  ``int32`` of the param's rank whose every axis is 1 or the param's (fresh:
  ``(1,) * ndim``).
  """

  mu: optax.Updates
  nu: optax.Updates
  count: optax.Updates


def _increment(count: jax.Array) -> jax.Array:
  # Saturates at the dtype's maximum, like optax.safe_increment.
  max_value = jnp.iinfo(count.dtype).max
  return jnp.where(count < max_value, count + 1, max_value)


def _divide(x: jax.Array, y: jax.Array) -> jax.Array:
  """``x / y`` for a ``y`` that broadcasts against ``x``, as a true division.

  XLA rewrites a division by a broadcast value that has one use into a
  multiplication by its reciprocal, which rounds differently; optax's one
  count, shared by every param, escapes that rewrite. Dividing by the
  broadcast value behind a barrier keeps the update bit for bit optax's.
  """
  if jnp.shape(y) == jnp.shape(x):
    return x / y
  return x / jax.lax.optimization_barrier(jnp.broadcast_to(y, jnp.shape(x)))


def scale_by_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
) -> optax.GradientTransformation:
  """Rescales updates by Adam, with a bias-correction count per tensor.

  Args:
    b1: Decay rate of the first moment.
    b2: Decay rate of the second moment.
    eps: Added to the denominator, outside the square root.
    eps_root: Added to the second moment, inside the square root.

  Returns:
    An ``optax.GradientTransformation`` whose state is ``ScaleByAdamState``.
  """

  def init_fn(params: optax.Params) -> ScaleByAdamState:
    return ScaleByAdamState(
        mu=optax.tree.zeros_like(params),
        nu=optax.tree.zeros_like(params),
        count=jax.tree.map(
            lambda p: jnp.zeros((1,) * len(jnp.shape(p)), jnp.int32), params
        ),
    )

  def update_fn(
      updates: optax.Updates,
      state: ScaleByAdamState,
      params: optax.Params | None = None,
  ) -> tuple[optax.Updates, ScaleByAdamState]:
    del params

    def one(g, m, v, c):
      m = (1 - b1) * g + b1 * m
      v = (1 - b2) * g**2 + b2 * v
      c = _increment(c)
      m_hat = _divide(m, (1 - b1**c).astype(m.dtype))  # c broadcasts.
      v_hat = _divide(v, (1 - b2**c).astype(v.dtype))
      return m_hat / (jnp.sqrt(v_hat + eps_root) + eps), m, v, c

    out = jax.tree.map(one, updates, state.mu, state.nu, state.count)
    treedef = jax.tree.structure(updates)
    new_updates, mu, nu, count = jax.tree.transpose(
        treedef, jax.tree.structure((0, 0, 0, 0)), out
    )
    return new_updates, ScaleByAdamState(mu=mu, nu=nu, count=count)

  return optax.GradientTransformation(init_fn, update_fn)


def adam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
  """Adam (``optax.adam``'s math) with a count per tensor.

  Args:
    learning_rate: A float or an optax schedule.
    b1: Decay rate of the first moment.
    b2: Decay rate of the second moment.
    eps: Added to the denominator.

  Returns:
    ``optax.chain(scale_by_adam(...), scale_by_learning_rate(...))``; flat
    state keys look like ``opt_state/0/mu/Dense_1/kernel``.
  """
  return optax.chain(
      scale_by_adam(b1=b1, b2=b2, eps=eps),
      optax.scale_by_learning_rate(learning_rate),
  )


def adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    mask: Any = None,
) -> optax.GradientTransformation:
  """AdamW (``optax.adamw``'s math) with a count per tensor.

  Args:
    learning_rate: A float or an optax schedule.
    b1: Decay rate of the first moment.
    b2: Decay rate of the second moment.
    eps: Added to the denominator.
    weight_decay: Decoupled weight decay rate.
    mask: Tree of bools (or a callable giving one) choosing the params to
      decay, as in ``optax.add_decayed_weights``; ``None`` decays all.

  Returns:
    ``optax.chain(scale_by_adam(...), add_decayed_weights(...),
    scale_by_learning_rate(...))``.
  """
  return optax.chain(
      scale_by_adam(b1=b1, b2=b2, eps=eps),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def _shrink(count: Any) -> Any:
  """``count`` with size 1 along every axis where its values are equal."""
  for axis, size in enumerate(np.shape(count)):
    if size > 1:
      first = count[(slice(None),) * axis + (slice(0, 1),)]
      if bool((count == first).all()):
        count = first
  return count


def compact_counts(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Shrinks every count to size 1 along each axis where it is uniform.

  A per-element count of an older checkpoint becomes one count per tensor
  (or one per entry of an edited axis); the updates stay the same, bit for
  bit. Values decide the shapes here, so use it on concrete states only
  (a resume), not in a plan.

  Args:
    flat: A flat state with ``params/`` and ``opt_state/`` keys.

  Returns:
    ``flat`` with the smaller counts (sliced where they live); every other
    leaf is the same object.
  """
  out = dict(flat)
  for param_key, slot_keys in slots.slot_index(flat).items():
    for key in slot_keys:
      if (counts_lib.is_count(slots.split_slot(key, param_key))
          and np.size(flat[key]) > 1):
        out[key] = _shrink(flat[key])
  return out
