"""Adam with a per-element step count, so surgery can make fresh slots.

``optax.scale_by_adam`` keeps one scalar ``count`` for bias correction. After
surgery gives some params fresh (zero) moments while the others carry on at
step ``t``, the fresh ones are bias-corrected as if they had ``t`` steps of
history, and their first update is up to ``sqrt(1 - b2) / (1 - b1)`` (about
3.16) times the learning rate. Here ``count`` is an ``int32`` tree shaped like
the params, so it is one more optimizer slot: a reset or new entry has count 0
and gets the usual first Adam step, never larger than the learning rate.

With equal counts everywhere the math is that of ``optax.scale_by_adam``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ['ScaleByAdamState', 'adam', 'adamw', 'scale_by_adam']


class ScaleByAdamState(NamedTuple):
  """State of ``scale_by_adam``: every field is a tree shaped like params."""

  mu: optax.Updates
  nu: optax.Updates
  count: optax.Updates  # int32, per element.


def _increment(count: jax.Array) -> jax.Array:
  # Saturates at the dtype's maximum, like optax.safe_increment.
  max_value = jnp.iinfo(count.dtype).max
  return jnp.where(count < max_value, count + 1, max_value)


def scale_by_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
) -> optax.GradientTransformation:
  """Rescales updates by Adam, with a per-element bias-correction count.

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
            lambda p: jnp.zeros(jnp.shape(p), jnp.int32), params
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
      m_hat = m / (1 - b1**c).astype(m.dtype)
      v_hat = v / (1 - b2**c).astype(v.dtype)
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
  """Adam (``optax.adam``'s math) with per-element counts.

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
  """AdamW (``optax.adamw``'s math) with per-element counts.

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
