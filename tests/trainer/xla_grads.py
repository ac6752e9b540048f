"""The seed CNN's loss gradient on a fixed small batch (tests of trainer.xla).

`python -m tests.trainer.xla_grads OUT.npz` writes the gradient compiled
with no compiler options, so that a test can run it under XLA_FLAGS (which
XLA reads once, when the backend starts: hence the fresh process) and
compare it with the in-process `jax.jit(..., compiler_options=...)` form.
"""

import sys
from typing import Any

import jax
import numpy as np
import optax

import hooks
from trainer import models

BATCH = 16


def grads(compiler_options: dict[str, Any] | None = None
          ) -> dict[str, np.ndarray]:
  """Flat key -> the gradient of the mean cross-entropy, as numpy."""
  model = models.create('cnn', 10)
  params = models.init_params(model, jax.random.key(0))
  rng = np.random.default_rng(0)
  images = rng.random((BATCH, 28, 28, 1), np.float32)
  labels = rng.integers(0, 10, BATCH).astype(np.int32)

  def loss(p):
    logits = model.apply({'params': p}, images)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()

  grad = jax.jit(jax.grad(loss), compiler_options=compiler_options)(params)
  return {k: np.asarray(v)
          for k, v in hooks.flatten(jax.device_get(grad)).items()}


if __name__ == '__main__':
  np.savez(sys.argv[1], **grads())
