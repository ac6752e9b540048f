"""Helpers for tests that run the trainer and compare what runs leave behind."""

import os
import subprocess
import sys
from typing import Any

import jax
import numpy as np

from configs import tiny
import hooks
from trainer import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))


def tiny_config(**overrides: Any) -> Any:
  """The tiny config keeping 20 checkpoints, dotted fields overridden."""
  config = tiny.get_config()
  config.keep_checkpoints = 20
  config.update_from_flattened_dict(overrides)
  return config


def final_state(workdir: str, step: int | None = None) -> dict[str, np.ndarray]:
  """The flat state of a workdir's latest (or given) checkpoint, as numpy."""
  ckpt_dir = checkpoint.directory(workdir)
  step = checkpoint.latest_step(workdir) if step is None else step
  raw = checkpoint.read_raw(ckpt_dir, step)
  return {k: np.asarray(v) for k, v in hooks.flatten_raw(raw).items()}


def assert_bitwise_equal(a: dict[str, np.ndarray],
                         b: dict[str, np.ndarray]) -> None:
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key, strict=True)


def trainer_command(*args: str) -> list[str]:
  return [sys.executable, '-m', 'trainer', *args]


def env(**extra: str) -> dict[str, str]:
  out = dict(os.environ)
  out.update(extra)
  out['PYTHONPATH'] = REPO + os.pathsep + out.get('PYTHONPATH', '')
  return out


def run_trainer(*args: str, timeout: float = 300, **extra_env: str
                ) -> subprocess.CompletedProcess:
  """Runs `python -m trainer ARGS` in a subprocess from the repo root."""
  return subprocess.run(trainer_command(*args), cwd=REPO, env=env(**extra_env),
                        capture_output=True, text=True, timeout=timeout,
                        check=False)


def device_count() -> int:
  return jax.device_count()


def file_tree(path) -> dict[str, tuple[int, int]]:
  """Every file under `path` with its size and mtime, to prove nothing changed."""
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      st = os.stat(full)
      out[full] = (st.st_size, st.st_mtime_ns)
  return out
