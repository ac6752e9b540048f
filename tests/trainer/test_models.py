"""The seed CNN: names, shapes and parameter count from the surgery document."""

from flax import nnx
import jax
import numpy as np
import pytest

import hooks
from trainer import models


def test_seed_cnn_has_the_documents_flat_shapes():
  params = models.init_params(models.create('cnn', 10), jax.random.key(0))
  shapes = {k: v.shape for k, v in hooks.flatten(params).items()}
  assert shapes == {
      'Conv_0/bias': (32,), 'Conv_0/kernel': (3, 3, 1, 32),
      'Conv_1/bias': (64,), 'Conv_1/kernel': (3, 3, 32, 64),
      'Dense_0/bias': (256,), 'Dense_0/kernel': (3136, 256),
      'Dense_1/bias': (10,), 'Dense_1/kernel': (256, 10),
  }
  assert sum(int(np.prod(s)) for s in shapes.values()) == 824_458


def test_class_count_sets_the_head():
  params = models.init_params(models.create('cnn', 5), jax.random.key(0))
  assert params['Dense_1']['kernel'].shape == (256, 5)


def test_unknown_model_lists_the_known_ones():
  with pytest.raises(KeyError, match=r"unknown model 'resnet'.*\['cnn'\]"):
    models.create('resnet', 10)


def _flat_shapes(params):
  return {k: (v.shape, v.dtype) for k, v in hooks.flatten(params).items()}


def test_nnx_cnn_has_the_linen_cnns_flat_keys_and_shapes():
  for classes in (10, 5):
    linen = models.build('cnn', classes, 'linen')
    nnx_model = models.build('cnn', classes, 'nnx')
    key = jax.random.key(0)
    assert (_flat_shapes(jax.eval_shape(nnx_model.init, key))
            == _flat_shapes(jax.eval_shape(linen.init, key)))
  # The module itself, as an NNX user builds it.
  module = models.create_nnx('cnn', 10, nnx.Rngs(params=0))
  params = nnx.state(module, nnx.Param).to_pure_dict()
  assert _flat_shapes(params) == _flat_shapes(
      models.init_params(models.create('cnn', 10), jax.random.key(0)))


def test_nnx_cnn_computes_what_the_linen_cnn_computes():
  # The same params through both forms give the same log-probabilities, bit
  # for bit: the same layers, relu and pooling.
  params = models.init_params(models.create('cnn', 10), jax.random.key(1))
  images = jax.random.uniform(jax.random.key(2), (4, 28, 28, 1))
  linen = models.build('cnn', 10, 'linen')
  nnx_model = models.build('cnn', 10, 'nnx')
  np.testing.assert_array_equal(
      jax.jit(nnx_model.apply)({'params': params}, images),
      jax.jit(linen.apply)({'params': params}, images), strict=True)


def test_nnx_apply_is_equal_for_equal_graphs():
  # The TrainState's apply_fn is static pytree data: equal objects, no retrace.
  first, second = models.build('cnn', 10, 'nnx'), models.build('cnn', 10, 'nnx')
  assert first.apply == second.apply and first.apply is not second.apply
  assert hash(first.apply) == hash(second.apply)
  assert first.apply != models.build('cnn', 5, 'nnx').apply


def test_nnx_init_follows_the_seed():
  model = models.build('cnn', 10, 'nnx')
  a, b, c = (model.init(jax.random.key(s)) for s in (0, 0, 1))
  np.testing.assert_array_equal(a['Conv_0']['kernel'], b['Conv_0']['kernel'])
  assert not np.array_equal(a['Conv_0']['kernel'], c['Conv_0']['kernel'])
  np.testing.assert_array_equal(a['Dense_1']['bias'], np.zeros(10))


class _WithBatchNorm(nnx.Module):

  def __init__(self, num_classes, *, rngs):
    self.BatchNorm_0 = nnx.BatchNorm(4, rngs=rngs)


def test_nnx_model_with_state_besides_params_is_refused(monkeypatch):
  monkeypatch.setitem(models.NNX_MODELS, 'bn', _WithBatchNorm)
  with pytest.raises(ValueError, match=(
      r"the NNX model 'bn' holds state other than nnx.Param "
      r"\[\('BatchNorm_0/mean', 'BatchStat'\), \('BatchNorm_0/var', "
      r"'BatchStat'\)\]")):
    models.build('bn', 10, 'nnx')


def test_unknown_api_and_unknown_nnx_model():
  with pytest.raises(ValueError, match=r"unknown Flax API 'jax'; use one of "
                     r"\['linen', 'nnx'\]"):
    models.build('cnn', 10, 'jax')
  with pytest.raises(KeyError, match=r"unknown NNX model 'resnet'.*\['cnn'\]"):
    models.build('resnet', 10, 'nnx')
