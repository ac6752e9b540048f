"""Shared fixtures: the tiny config and helpers to run and read runs."""

import os

import pytest

# Keep TensorFlow's C++ start-up lines out of test logs.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny_config():
  from configs import tiny  # pylint: disable=g-import-not-at-top
  return tiny.get_config()
