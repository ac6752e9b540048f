"""The seed CNN: names, shapes and parameter count from the surgery document."""

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
