"""Shared fixtures: the tiny config and helpers to run and read runs."""

import os

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache
import pytest

# Keep TensorFlow's C++ start-up lines out of test logs.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Compiles at least this long go to the session's persistent cache.
CACHE_MIN_COMPILE_SECS = 0.3


@pytest.fixture(scope='session', autouse=True)
def compilation_cache(tmp_path_factory):
  """JAX's persistent compilation cache, one per test process, for a session.

  Most tests train the same tiny runs: the same init, train and eval steps
  (about 12 CPU-seconds of XLA compiles a run) are compiled once and read
  back after. Only compiles are shared, in this process: a test's runs,
  values and compile counts (jax_log_compiles logs each lowering, cached or
  not) are what they are without it. Subprocesses a test starts do not
  inherit it (the tiny `loop` benchmark hands it to its child). JAX sets its
  cache up once a process: a run's own config.compilation_cache_dir changes
  nothing here unless the test resets it (compilation_cache.reset_cache(),
  as tests/experiments does).
  """
  path = str(tmp_path_factory.mktemp('jax_cache'))
  flags = {
      'jax_compilation_cache_dir': path,
      'jax_persistent_cache_min_compile_time_secs': CACHE_MIN_COMPILE_SECS,
      'jax_persistent_cache_min_entry_size_bytes': 0}
  previous = {flag: getattr(jax.config, flag) for flag in flags}
  for flag, value in flags.items():
    jax.config.update(flag, value)
  jax_cache.reset_cache()
  yield path
  for flag, value in previous.items():
    jax.config.update(flag, value)
  jax_cache.reset_cache()


@pytest.fixture
def tiny_config():
  from configs import tiny  # pylint: disable=g-import-not-at-top
  return tiny.get_config()
