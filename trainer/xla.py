"""The XLA compiler options of a run's jitted steps, chosen for its backend.

XLA:CPU (jaxlib 0.10.2) runs convolutions through YNNPACK by default. For
the seed CNN, sending them back to Eigen made the train step 1.86x faster at
low load (issue 12; `benchmarks/step.py` measures it), with allclose
results. config.xla.cpu_convolutions chooses:

- 'auto' (default): Eigen on the CPU backend; nothing on GPU or TPU (the
  option concerns XLA:CPU only); nothing either when the user's XLA_FLAGS
  already set the option, so that their choice stands.
- 'eigen': Eigen, on any backend.
- 'xla_default': no option: whatever this jaxlib does by default (YNNPACK
  on jaxlib 0.10.2).

The choice is applied per compilation, as `jax.jit(...,
compiler_options=...)` on each of the trainer's steps; XLA_FLAGS is never
changed (only read, to leave a user's own setting of the option alone).
config.xla.compiler_options adds raw XLA options to the same compilations
(a key given there wins). The resolved choice is a `Compilation`: the
trainer records it in summary.json and in every checkpoint's `meta`, and
warns when a resumed run compiles differently from the checkpoint it
resumes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping

from absl import logging
import jax
import ml_collections
import numpy as np

from trainer.errors import ConfigError

CPU_CONVOLUTIONS = ('auto', 'eigen', 'xla_default')
YNN_FUSION_TYPE = 'xla_cpu_experimental_ynn_fusion_type'
# The per-compile value replaces XLA's whole list (full enum names). This is
# jaxlib 0.10.2's default list (INDIVIDUAL_DOT, REDUCE, INDIVIDUAL_CONVOLUTION)
# without INDIVIDUAL_CONVOLUTION: the same bits as XLA_FLAGS=
# --xla_cpu_experimental_ynn_fusion_type=-individual_convolution
# (tests/trainer/test_xla.py checks it on the installed jaxlib).
EIGEN_CONVOLUTIONS = {
    YNN_FUSION_TYPE:
        'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'}
_OPTION_TYPES = (str, bool, int, float)


@dataclasses.dataclass(frozen=True)
class Compilation:
  """How the trainer compiles its steps.

  Attributes:
    cpu_convolutions: the resolved choice, 'eigen' or 'xla_default'.
    reason: why, in a sentence (for the log and summary.json).
    options: the compiler options every step is jitted with (may be empty).
  """
  cpu_convolutions: str
  reason: str
  options: Mapping[str, Any]

  @property
  def compiler_options(self) -> dict[str, Any] | None:
    """The `compiler_options` argument of `jax.jit` (None: no options)."""
    return dict(self.options) or None

  def record(self) -> dict[str, Any]:
    """The choice as JSON data, for summary.json and checkpoint metadata."""
    return {'cpu_convolutions': self.cpu_convolutions, 'reason': self.reason,
            'compiler_options': dict(self.options)}


def raw_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """config.xla.compiler_options as a plain dict ({} when unset), checked.

  Raises:
    ConfigError: it is not a dict of option name -> str, bool, int or float.
  """
  raw = config.xla.compiler_options
  raw = {} if raw is None else raw
  raw = raw.to_dict() if hasattr(raw, 'to_dict') else raw
  if not isinstance(raw, dict) or not all(
      isinstance(k, str) and isinstance(v, _OPTION_TYPES)
      for k, v in raw.items()):
    raise ConfigError(
        f'config.xla.compiler_options={raw!r} is not allowed: use a dict of '
        'XLA option name -> str, bool, int or float, e.g. '
        f'"{{{YNN_FUSION_TYPE!r}: {EIGEN_CONVOLUTIONS[YNN_FUSION_TYPE]!r}}}".')
  return dict(raw)


def resolve(setting: str, raw: Mapping[str, Any], backend: str,
            xla_flags: str = '') -> Compilation:
  """The compilation `setting` means on `backend`; pure.

  Args:
    setting: config.xla.cpu_convolutions.
    raw: config.xla.compiler_options, added on top (its keys win).
    backend: `jax.default_backend()`: 'cpu', 'gpu', 'tpu', ...
    xla_flags: the XLA_FLAGS environment variable; 'auto' leaves the
      convolutions to it when it sets the option.

  Returns:
    The resolved choice and its options.

  Raises:
    ConfigError: `setting` is not one of `CPU_CONVOLUTIONS`.
  """
  if setting not in CPU_CONVOLUTIONS:
    raise ConfigError(f'config.xla.cpu_convolutions={setting!r} is not '
                      f'allowed: use one of {list(CPU_CONVOLUTIONS)}.')
  if setting != 'auto':
    choice, reason = setting, f'config.xla.cpu_convolutions={setting!r}'
  elif YNN_FUSION_TYPE in xla_flags:
    choice, reason = 'xla_default', (
        f'auto: XLA_FLAGS sets {YNN_FUSION_TYPE}, which stands')
  elif backend != 'cpu':
    choice, reason = 'xla_default', (
        f'auto: the {backend} backend (the option concerns XLA:CPU only)')
  else:
    choice, reason = 'eigen', ('auto: the CPU backend runs convolutions '
                               'faster through Eigen than through YNNPACK')
  options = dict(EIGEN_CONVOLUTIONS) if choice == 'eigen' else {}
  if set(raw) & set(options):
    reason += '; config.xla.compiler_options overrides ' + ', '.join(
        sorted(set(raw) & set(options)))
  return Compilation(choice, reason, {**options, **raw})


def refusal(options: Mapping[str, Any]) -> str | None:
  """XLA's error for compiling with `options`, or None if it accepts them.

  XLA's answer is asked once per process for each set of options: a tiny
  program is compiled with them.
  """
  return _refusal(tuple(sorted(options.items())))


@functools.lru_cache(maxsize=None)
def _refusal(options: tuple[tuple[str, Any], ...]) -> str | None:
  try:
    jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(
        np.float32(0)).compile()
  except Exception as e:  # pylint: disable=broad-except
    # XLA's JaxRuntimeError: "No such compile option", "not a valid enum".
    return str(e).splitlines()[0]
  return None


def from_config(config: ml_collections.ConfigDict) -> Compilation:
  """config.xla resolved for this process's backend, checked by XLA itself.

  The backend is `jax.default_backend()`; XLA_FLAGS is read, never changed.
  A tiny program is compiled once per process with the options, so that a
  bad option fails here rather than at the first step. 'auto' falls back to
  XLA's default (with the reason) on a jaxlib without the option.

  Args:
    config: the run config.

  Returns:
    The run's compilation.

  Raises:
    ConfigError: a bad config.xla field, or options XLA refuses.
  """
  backend, xla_flags = jax.default_backend(), os.environ.get('XLA_FLAGS', '')
  raw = raw_options(config)
  setting = config.xla.cpu_convolutions
  compilation = resolve(setting, raw, backend, xla_flags)
  if setting == 'auto' and compilation.cpu_convolutions == 'eigen':
    error = refusal(EIGEN_CONVOLUTIONS)
    if error:
      compilation = dataclasses.replace(
          resolve('xla_default', raw, backend, xla_flags),
          reason=f'auto: this jaxlib refuses {YNN_FUSION_TYPE} ({error}), '
          "so XLA's default stands")
  error = refusal(compilation.options) if compilation.options else None
  if error:
    if raw and refusal(raw):
      fix = 'fix or remove it in config.xla.compiler_options'
    else:
      fix = ("this jaxlib does not take it: set config.xla.cpu_convolutions "
             "to 'auto' or 'xla_default'")
    raise ConfigError(
        f'XLA refuses the compiler options {dict(compilation.options)} '
        f'(config.xla.cpu_convolutions={setting!r}, config.xla.'
        f'compiler_options={raw}): {error}; {fix}.')
  logging.info('XLA: %s convolutions on %s (%s); compiler options %s.',
               compilation.cpu_convolutions, backend, compilation.reason,
               dict(compilation.options))
  return compilation


def resume_change(stored: Mapping[str, Any] | None,
                  current: Compilation) -> str | None:
  """What differs from the compilation a checkpoint was trained with.

  Args:
    stored: the `record()` in the checkpoint's meta; None for a checkpoint
      written before the record existed (XLA's defaults, no options).
    current: this run's compilation.

  Returns:
    A warning for the log, or None when the steps compile as they did.
  """
  stored = stored or {'cpu_convolutions': 'xla_default',
                      'compiler_options': {}}
  if dict(stored['compiler_options']) == dict(current.options):
    return None
  return (
      'Resume: the checkpoint was trained with compiler options '
      f'{stored["compiler_options"]} (cpu_convolutions='
      f'{stored["cpu_convolutions"]!r}); this run compiles with '
      f'{dict(current.options)} (cpu_convolutions='
      f'{current.cpu_convolutions!r}). Results stay allclose but are not '
      'bitwise those of an uninterrupted run; for that, set '
      f'--config.xla.cpu_convolutions={stored["cpu_convolutions"]} (and '
      "config.xla.compiler_options as stored).")
