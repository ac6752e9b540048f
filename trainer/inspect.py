"""`python -m trainer.inspect PATH [--step N] [--filter REGEX]`: a checkpoint.

PATH is a workdir (its latest checkpoint, or --step), an orbax checkpoint
step directory or a legacy flax msgpack file. Prints which checkpoint and
step it shows and the steps next to it, then every leaf's flat key, shape,
dtype, element count and bytes, sorted by key as the surgery document's
tables are. Orbax checkpoints are described from metadata alone; a msgpack
file has no separate metadata and is read whole.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Mapping, Sequence

from absl import flags
from absl import logging
import jax
import numpy as np

import hooks
from hooks import orbax_donor
from trainer import cli


def table(structure: Mapping[str, jax.ShapeDtypeStruct],
          pattern: str | None = None) -> str:
  """Formats leaves as aligned rows with a totals line.

  Args:
    structure: flat key -> shape and dtype.
    pattern: keep only keys that this regex finds (re.search).

  Returns:
    The table text.
  """
  keys = sorted(k for k in structure
                if pattern is None or re.search(pattern, k))
  rows = [('key', 'shape', 'dtype', 'count', 'bytes')]
  total_count = total_bytes = 0
  for key in keys:
    leaf = structure[key]
    count = int(np.prod(leaf.shape, dtype=np.int64))
    nbytes = count * np.dtype(leaf.dtype).itemsize
    total_count += count
    total_bytes += nbytes
    rows.append((key, str(tuple(leaf.shape)), str(np.dtype(leaf.dtype)),
                 f'{count:,}', f'{nbytes:,}'))
  widths = [max(len(r[i]) for r in rows) for i in range(5)]
  lines = [f'{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  '
           f'{r[3]:>{widths[3]}}  {r[4]:>{widths[4]}}'.rstrip() for r in rows]
  lines.append(f'{len(keys)} arrays, {total_count:,} values, '
               f'{total_bytes:,} bytes')
  return '\n'.join(lines)


def available_steps(path: str, step: int | None) -> list[int]:
  """The steps of the checkpoint root that `path` is, holds or is a step of.

  Args:
    path: what was inspected: a checkpoint root, a workdir (a directory
      holding one root), a step directory or a step file (checkpoint_20).
    step: the step shown.

  Returns:
    The root's steps, ascending; [] when `path` is in no root (a lone file).

  Raises:
    hooks.DonorError: a root names a step twice.
  """
  path = os.path.abspath(os.path.expanduser(path))
  roots = []
  if os.path.isdir(path):
    roots = [path] + sorted(e.path for e in os.scandir(path) if e.is_dir())
  if step is not None and orbax_donor.step_of(os.path.basename(path)) == step:
    roots.append(os.path.dirname(path))  # A step of its parent.
  for root in roots:
    steps = orbax_donor.steps(path, root, files=True)
    if step in steps:
      return sorted(steps)
  return []


def header(reader: hooks.DonorReader, steps: Sequence[int]) -> str:
  """Says what is shown: the path, its form and item, the step, the others."""
  item = f', item {reader.item!r}' if reader.item else ''
  step = 'no step' if reader.step is None else f'step {reader.step}'
  text = f'{reader.path}: {step} ({reader.form}{item})'
  if len(steps) > 1:
    return (f'{text}; steps available: {", ".join(map(str, steps))} '
            '(--step N shows another)')
  return f'{text}; the only step there' if steps else text


def main(argv: Sequence[str]) -> int:
  """Prints the table for the PATH in argv; returns the exit status."""
  values = flags.FlagValues()
  flags.DEFINE_integer('step', None, 'The step to show when PATH holds '
                       'several (default: the latest).', flag_values=values)
  flags.DEFINE_string('filter', None, 'Only keys matching this regex.',
                      flag_values=values)
  if any(arg in cli.HELP for arg in argv[1:]):
    print(cli.help_text(__doc__, values))
    return 0
  try:
    rest = values(list(argv))
    if len(rest) != 2:
      raise flags.Error('give exactly one PATH: a workdir, a checkpoint step '
                        'directory or a legacy flax msgpack file')
    if values.filter is not None:
      re.compile(values.filter)
  except (flags.Error, re.error) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  cli.setup_logging(logging.WARNING)
  try:
    reader = hooks.open_donor(rest[1], step=values.step)
    steps = available_steps(rest[1], reader.step)
  except (hooks.DonorError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(header(reader, steps))
  print(table(reader.structure(), values.filter))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
