"""Tiny models and states shared by the hooks tests."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.training import train_state

from hooks import optim
from hooks import stored_arrays


class TinyCNN(nn.Module):
  """The seed document's CNN, shrunk: two convs, two dense layers."""

  num_classes: int = 5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Conv(features=4, kernel_size=(3, 3))(x))
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nn.relu(nn.Conv(features=8, kernel_size=(3, 3))(x))
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(features=16)(x))
    return nn.Dense(features=self.num_classes)(x)


IMAGE_SHAPE = (8, 8, 1)


@functools.partial(jax.jit, static_argnums=1)
def _init(seed: jax.Array, num_classes: int) -> Any:
  model = TinyCNN(num_classes)
  return model.init(jax.random.key(seed), jnp.ones((1, *IMAGE_SHAPE)))['params']


@functools.lru_cache(maxsize=None)
def init_params(seed: int = 0, num_classes: int = 5) -> Any:
  """Cached and compiled once: eager init is slow on CPU."""
  return _init(jnp.asarray(seed), num_classes)


def make_state(
    tx: optax.GradientTransformation | None = None,
    seed: int = 0,
    num_classes: int = 5,
) -> train_state.TrainState:
  tx = optim.adam(1e-2) if tx is None else tx
  model = TinyCNN(num_classes)
  return train_state.TrainState.create(
      apply_fn=model.apply, params=init_params(seed, num_classes), tx=tx
  )


class StatsState(train_state.TrainState):
  """A TrainState subclass with another collection, as BatchNorm nets have."""

  batch_stats: Any = None


def make_stats_state(
    tx: optax.GradientTransformation | None = None,
    seed: int = 0,
    num_classes: int = 5,
) -> StatsState:
  """TinyCNN's state with ``batch_stats`` for Conv_0 and the head Dense_1.

  The head's statistics have one entry per class, so they are relabelled
  with the head's kernel and bias. Values differ by seed.
  """
  base = make_state(tx, seed, num_classes)
  k0, k1 = jax.random.split(jax.random.key(seed + 2000))
  stats = {
      'Conv_0': {'mean': jax.random.normal(k0, (4,)), 'var': jnp.ones((4,))},
      'Dense_1': {'mean': jax.random.normal(k1, (num_classes,))},
  }
  return StatsState.create(apply_fn=base.apply_fn, params=base.params,
                           tx=base.tx, batch_stats=stats)


@functools.lru_cache(maxsize=None)
def batch(seed: int = 0, n: int = 4, num_classes: int = 5):
  kx, ky = jax.random.split(jax.random.key(seed + 1000))
  return (
      jax.random.normal(kx, (n, *IMAGE_SHAPE)),
      jax.random.randint(ky, (n,), 0, num_classes),
  )


def loss_fn(params, apply_fn, images, labels):
  logits = apply_fn({'params': params}, images)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_step(state: train_state.TrainState, images, labels):
  grads = jax.grad(loss_fn)(state.params, state.apply_fn, images, labels)
  return state.apply_gradients(grads=grads)


def abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)


# Compiled once per state structure; eager conv gradients are slow on CPU.
jitted_train_step = jax.jit(train_step)


def inject_adam(learning_rate: float = 1e-2) -> optax.GradientTransformation:
  """hooks.optim.adam inside inject_hyperparams, as the trainer builds it."""
  return optax.inject_hyperparams(optim.adam)(
      learning_rate=optax.constant_schedule(learning_rate))


class MemoryReader:
  """A checkpoint held in memory: a ``hooks.DonorReader`` that logs reads."""

  form = 'memory'
  item = None
  metadata: Mapping[str, Any] = {}

  def __init__(self, flat: Mapping[str, Any], step: int | None = None):
    # Writable copies: a hook that wrote into what it read would show.
    # As JAX would hold them (a Python int step is int32), like real readers.
    self._flat = {
        k: np.array(v, jax.dtypes.canonicalize_dtype(np.result_type(v)))
        for k, v in flat.items()}
    self.pristine = {k: v.copy() for k, v in self._flat.items()}
    self.step = step
    self.reads: list[list[str]] = []

  @property
  def path(self) -> str:
    return '<memory>'

  def structure(self) -> dict[str, jax.ShapeDtypeStruct]:
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
            for k, v in self._flat.items()}

  def read(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
    self.reads.append(list(keys))
    return {k: self._flat[k] for k in keys}

  def read_slices(self, key: str, indices: Sequence[Any]
                  ) -> list[np.ndarray]:
    self.reads.append([key])
    return [self._flat[key][tuple(slice(*axis) for axis in index)]
            for index in indices]

  def chunked(self, key: str) -> bool:
    del key
    return False  # Held whole.

  def digest(self) -> str:
    sha = hashlib.sha256()
    for key in sorted({k for keys in self.reads for k in keys}):
      sha.update(key.encode() + self._flat[key].tobytes())
    return sha.hexdigest()

  def check_unwritten(self) -> None:
    """Asserts that no array this reader handed out was written into."""
    for key, value in self.pristine.items():
      np.testing.assert_array_equal(self._flat[key], value, err_msg=key)

  def provenance(self) -> dict[str, Any]:
    return {'path': self.path, 'form': self.form, 'step': self.step,
            'item': self.item, 'sha256': self.digest() if self.reads else None,
            'keys_read': sorted({k for keys in self.reads for k in keys})}


def spy_on_orbax_reads(monkeypatch: Any) -> list[str]:
  """Records the names of the stored orbax tensors read from now on.

  Names are orbax's dotted ones (``params.head.kernel``,
  ``Conv_0.kernel.value``); the list grows as reads happen (donor reads go
  through ``hooks.stored_arrays.StoredArrays.read``).
  """
  seen: list[str] = []
  original = stored_arrays.StoredArrays.read

  def spy(self, name, indices=None):
    seen.append(name)
    return original(self, name, indices)

  monkeypatch.setattr(stored_arrays.StoredArrays, 'read', spy)
  return seen
