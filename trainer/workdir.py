"""The run's workdir: checked before anything is written, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from trainer.errors import WorkdirError


def check_writable(workdir: str) -> None:
  """Raises WorkdirError unless `workdir` is, or can become, a writable directory.

  Probes with a temporary file that is removed at once, in the workdir or in
  its nearest existing parent, so a bad workdir is found before any output.

  Args:
    workdir: the path given with --workdir.

  Raises:
    WorkdirError: naming the path and what is wrong with it.
  """
  if not workdir:
    raise WorkdirError('--workdir is required: a directory for checkpoints, '
                       'metrics and summary.json.')
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f'workdir {workdir!r} is a file, not a directory; '
                       'choose another --workdir.')
  probe_dir = path
  while not os.path.exists(probe_dir):
    probe_dir = os.path.dirname(probe_dir)
  if not os.path.isdir(probe_dir):
    raise WorkdirError(f'workdir {workdir!r} cannot be created: {probe_dir!r} '
                       'is a file; choose another --workdir.')
  try:
    with tempfile.TemporaryFile(dir=probe_dir):
      pass
  except OSError as e:
    raise WorkdirError(f'workdir {workdir!r} is not writable ({probe_dir!r}: '
                       f'{e.strerror}); choose another --workdir.') from e


def write_json(path: str, data: dict[str, Any]) -> None:
  """Writes JSON so that readers see the old file or the whole new one."""
  directory = os.path.dirname(path) or '.'
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix='.json')
  with os.fdopen(fd, 'w') as f:
    json.dump(data, f, indent=2, sort_keys=True)
    f.write('\n')
  os.replace(tmp, path)
