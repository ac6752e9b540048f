"""The machine a run ran on, for summaries, reports and benchmark rows."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any, Sequence

import jax

# The distributions a run's summary names by version.
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax')


def cpu_model() -> str:
  """The CPU's model name (from /proc/cpuinfo on Linux), or 'unknown'."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def versions(packages: Sequence[str]) -> dict[str, str]:
  """The installed version of each distribution, or 'not installed'."""
  found = {}
  for name in packages:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = 'not installed'
  return found


def environment(packages: Sequence[str] = PACKAGES) -> dict[str, Any]:
  """The machine, its JAX devices and the package versions, as plain data.

  One record for the trainer's summary.json, the experiments' reports and
  the benchmarks' result rows.

  Args:
    packages: the distributions to give versions of.

  Returns:
    cpu, cpu_count, platform, python, jax_backend, device_kind,
    device_count, process_count and versions (distribution -> version).
  """
  return {
      'cpu': cpu_model(),
      'cpu_count': os.cpu_count(),
      'platform': platform.platform(),
      'python': platform.python_version(),
      'jax_backend': jax.default_backend(),
      'device_kind': jax.devices()[0].device_kind,
      'device_count': jax.device_count(),
      'process_count': jax.process_count(),
      'versions': versions(packages),
  }
