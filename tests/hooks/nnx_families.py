"""The hooks tests' model families written in NNX, under the Linen names.

Each module names its layers as the Linen family's ``nn.compact`` names them
(``Conv_0``, ``BatchNorm_0``, ``head``, ``MultiHeadDotProductAttention_0``),
so ``hooks.nnx_state.flatten`` gives the same flat keys, shapes and dtypes
(only ``step`` differs: ``uint32`` in ``nnx.Optimizer``). A state is
``(model, nnx.Optimizer(model, tx, wrt=nnx.Param))``; hooks update it in
place, so tests copy a shared state with ``families.copy`` before a run.

- ``CNN``: ``TinyCNN`` (``Conv_0``, ``Conv_1``, ``Dense_0``, ``Dense_1``).
- ``BN``: ``BNNet`` (``Conv_0``, ``BatchNorm_0``, ``Dense_0``, ``head``).
- ``TRANSFORMER``: ``TinyTransformer`` (``Embed_0``, ``LayerNorm_0/1``,
  ``MultiHeadDotProductAttention_0``, ``Dense_0/1``, ``head``).
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import nnx

from tests.hooks import families
from tests.hooks import helpers
from tests.hooks import models


class TinyCNN(nnx.Module):
  """``helpers.TinyCNN`` in NNX: two convs, two dense layers."""

  def __init__(self, outputs: int = 5, *, rngs: nnx.Rngs):
    self.Conv_0 = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.Conv_1 = nnx.Conv(4, 8, (3, 3), rngs=rngs)
    self.Dense_0 = nnx.Linear(2 * 2 * 8, 16, rngs=rngs)
    self.Dense_1 = nnx.Linear(16, outputs, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    pool = lambda y: nnx.avg_pool(y, window_shape=(2, 2), strides=(2, 2))
    x = pool(nnx.relu(self.Conv_0(x)))
    x = pool(nnx.relu(self.Conv_1(x)))
    x = nnx.relu(self.Dense_0(x.reshape((x.shape[0], -1))))
    return self.Dense_1(x)


class BNNet(nnx.Module):
  """``models.BNNet`` in NNX: Conv -> BatchNorm -> Dense -> ``head``."""

  def __init__(self, outputs: int = 5, *, rngs: nnx.Rngs):
    self.Conv_0 = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.BatchNorm_0 = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
    self.Dense_0 = nnx.Linear(4 * 4 * 4, 8, rngs=rngs)
    self.head = nnx.Linear(8, outputs, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.BatchNorm_0(self.Conv_0(x)))
    x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nnx.relu(self.Dense_0(x.reshape((x.shape[0], -1))))
    return self.head(x)


class TinyTransformer(nnx.Module):
  """``families.TinyTransformer`` in NNX."""

  def __init__(self, vocab: int = 50, outputs: int = 5, features: int = 16,
               heads: int = 2, *, rngs: nnx.Rngs):
    self.Embed_0 = nnx.Embed(vocab, features, rngs=rngs)
    self.LayerNorm_0 = nnx.LayerNorm(features, rngs=rngs)
    self.MultiHeadDotProductAttention_0 = nnx.MultiHeadAttention(
        heads, features, decode=False, rngs=rngs)
    self.LayerNorm_1 = nnx.LayerNorm(features, rngs=rngs)
    self.Dense_0 = nnx.Linear(features, 2 * features, rngs=rngs)
    self.Dense_1 = nnx.Linear(2 * features, features, rngs=rngs)
    self.head = nnx.Linear(features, outputs, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.Embed_0(tokens)
    x = x + self.MultiHeadDotProductAttention_0(self.LayerNorm_0(x))
    y = nnx.relu(self.Dense_0(self.LayerNorm_1(x)))
    x = x + self.Dense_1(y)
    return self.head(x.mean(axis=1))


def rngs(seed: int) -> nnx.Rngs:
  # The first eager init with 'rbg' keys compiles several times faster on CPU
  # than with the default threefry, as for the Linen families.
  return nnx.Rngs(jax.random.key(seed, impl='rbg'))


def _state(model: nnx.Module, tx: optax.GradientTransformation
           ) -> tuple[nnx.Module, nnx.Optimizer]:
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def cnn_state(tx: optax.GradientTransformation, seed: int = 0,
              outputs: int = 5) -> tuple[TinyCNN, nnx.Optimizer]:
  return _state(TinyCNN(outputs, rngs=rngs(seed)), tx)


def bn_state(tx: optax.GradientTransformation, seed: int = 0,
             outputs: int = 5) -> tuple[BNNet, nnx.Optimizer]:
  return _state(BNNet(outputs, rngs=rngs(seed)), tx)


def transformer_state(tx: optax.GradientTransformation, seed: int = 0,
                      outputs: int = 5, vocab: int = 50
                      ) -> tuple[TinyTransformer, nnx.Optimizer]:
  return _state(TinyTransformer(vocab, outputs, rngs=rngs(seed)), tx)


def _images(shape: tuple[int, ...]) -> Any:
  return lambda key, **_: jax.random.normal(key, (families.BATCH, *shape))


CNN = families.Family('cnn', cnn_state, _images(helpers.IMAGE_SHAPE),
                      families.CNN.head, families.CNN.layers, api='nnx')
BN = families.Family('bn', bn_state, _images(models.BN_IMAGE_SHAPE),
                     families.BN.head, families.BN.layers, api='nnx')
TRANSFORMER = families.Family(
    'transformer', transformer_state, families.TRANSFORMER.inputs,
    families.TRANSFORMER.head, families.TRANSFORMER.layers, api='nnx')

FAMILIES = {f.name: f for f in (CNN, BN, TRANSFORMER)}
