"""What every benchmark shares: timing, subprocesses, memory, the results table.

Every figure is a ratio of two things measured side by side, after warm-up,
as a median over repeats. In one process the two (or three) are interleaved,
round by round, in alternating order (ABC, CBA, ...), so that a slow spell of
the machine hits all of them alike. Figures that need a fresh process run A
and B in alternating subprocesses.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Mapping, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, 'benchmarks', 'results')


@dataclasses.dataclass(frozen=True)
class Size:
  """How much a benchmark does: `full` for `make bench`, `tiny` for the test.

  Attributes:
    tiny: whether this is the smoke-test size.
    rounds: interleaved rounds (in-process) or subprocess pairs.
    steps: train steps per timed unit.
  """
  tiny: bool
  rounds: int
  steps: int


FULL = Size(tiny=False, rounds=10, steps=10)
TINY = Size(tiny=True, rounds=1, steps=2)


def median(values: Sequence[float]) -> float:
  return float(statistics.median(values))


def interleaved(units: Mapping[str, Callable[[], float]],
                rounds: int) -> dict[str, list[float]]:
  """Runs each timed unit once per round, reversing the order every round.

  Args:
    units: name -> a function that runs one timed unit and returns its
      seconds (it blocks on its own results).
    rounds: how many times each unit runs.

  Returns:
    name -> the seconds of each round.
  """
  names = list(units)
  seconds: dict[str, list[float]] = {name: [] for name in names}
  for r in range(rounds):
    for name in (names if r % 2 == 0 else names[::-1]):
      seconds[name].append(units[name]())
  return seconds


def round_ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
  """a[i] / b[i] for each round: the ratio of two units timed side by side."""
  return [x / y for x, y in zip(a, b)]


def figure(name: str, value: float, unit: str, goal: str, met: bool | None,
           command: str, **details: Any) -> dict[str, Any]:
  """One row of the results table."""
  return {'figure': name, 'value': value, 'unit': unit, 'goal': goal,
          'met': met, 'command': command, **details}


def command(name: str) -> str:
  return f'.venv/bin/python -m benchmarks {name}'


# Fresh processes ------------------------------------------------------------


def child_env(**extra: str) -> dict[str, str]:
  env = dict(os.environ)
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  env.update(extra)
  return env


def run_child(args: Sequence[str], timeout: float = 300,
              **extra_env: str) -> dict[str, Any]:
  """Runs `python ARGS` from the repo root; returns the JSON of its last line.

  Raises:
    RuntimeError: the child failed or printed no JSON (its output is quoted).
  """
  proc = subprocess.run([sys.executable, *args], cwd=REPO,
                        env=child_env(**extra_env), capture_output=True,
                        text=True, timeout=timeout, check=False)
  lines = proc.stdout.strip().splitlines()
  if proc.returncode != 0 or not lines:
    raise RuntimeError(f'{" ".join(args)} exited with {proc.returncode}:\n'
                       f'{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
  return json.loads(lines[-1])


class Memory:
  """This process's resident set (Linux /proc): now, and peak since a reset."""

  @staticmethod
  def _status(field: str) -> int:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith(field + ':'):
          return int(line.split()[1]) * 1024
    raise RuntimeError(f'/proc/self/status has no {field}')

  def reset_peak(self) -> None:
    """Sets the peak (VmHWM) to the current RSS (Linux >= 4.0)."""
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')

  def rss(self) -> int:
    return self._status('VmRSS')

  def peak(self) -> int:
    return self._status('VmHWM')


def now() -> float:
  return time.perf_counter()


class Compiles:
  """Counts XLA compiles, by function name, while active (jax_log_compiles).

  Use as a context manager; `names` maps 'jit(train_step)' and the like to
  counts, `times` lists (perf_counter, name) of each compile.
  """

  _LOGGER = 'jax._src.interpreters.pxla'

  def __init__(self) -> None:
    self.times: list[tuple[float, str]] = []

  @property
  def names(self) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, name in self.times:
      counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))

  def between(self, start: float, stop: float) -> list[str]:
    return [name for t, name in self.times if start <= t <= stop]

  def __enter__(self) -> 'Compiles':
    import logging  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    outer = self

    class Handler(logging.Handler):

      def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith('Compiling '):
          outer.times.append((now(), message.split()[1]))

    self._handler = Handler()
    self._logger = logging.getLogger(self._LOGGER)
    self._propagate = self._logger.propagate
    self._logger.addHandler(self._handler)
    self._logger.propagate = False  # Keep the log lines off stderr.
    self._previous = jax.config.jax_log_compiles
    jax.config.update('jax_log_compiles', True)
    return self

  def __exit__(self, *exc: Any) -> None:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update('jax_log_compiles', self._previous)
    self._logger.removeHandler(self._handler)
    self._logger.propagate = self._propagate


# Results --------------------------------------------------------------------


def write_result(out_dir: str, name: str, result: dict[str, Any]) -> str:
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f'{name}.json')
  with open(path, 'w') as f:
    json.dump(result, f, indent=2, sort_keys=True)
    f.write('\n')
  return path


def _fmt(value: Any) -> str:
  if isinstance(value, float):
    if abs(value) >= 100:
      return f'{value:,.0f}'
    return f'{value:.3g}' if abs(value) < 10 else f'{value:.1f}'
  return str(value)


def environment_cells(env: dict[str, Any]) -> tuple[str, str]:
  """The table's 'jax / jaxlib' and 'device' cells of a result's environment.

  Results are stamped with `trainer.host.environment()`; results written
  before it (the committed ones among them) carry 'jax', 'jaxlib' and
  'device' at the top level.
  """
  if 'versions' not in env:
    return f"{env['jax']} / {env['jaxlib']}", env['device']
  versions = env['versions']
  return (f"{versions['jax']} / {versions['jaxlib']}",
          f"{env['jax_backend']} {env['device_kind']} x{env['device_count']}")


def _result_files(out_dir: str, names: Sequence[str]
                  ) -> list[tuple[str, str]]:
  """(label, path) of each result: `<name>.json`, then `<name>@<machine>.json`.

  A `<name>@<machine>.json` is the same benchmark's result measured on
  another machine (e.g. `step@nvidia-h200.json`, from a lent GPU) and copied
  here; its rows carry that machine's environment.
  """
  files = []
  for name in names:
    path = os.path.join(out_dir, f'{name}.json')
    if os.path.exists(path):
      files.append((name, path))
    for other in sorted(glob.glob(os.path.join(out_dir, f'{name}@*.json'))):
      machine = os.path.basename(other)[len(name) + 1:-len('.json')]
      files.append((f'{name} ({machine})', other))
  return files


def write_table(out_dir: str, names: Sequence[str]) -> str:
  """Writes out_dir/README.md: one row per figure of every result there."""
  rows = ['| benchmark | figure | value | goal | met | before | jax / jaxlib '
          '| device | command |',
          '|---|---|---|---|---|---|---|---|---|']
  notes = []
  for name, path in _result_files(out_dir, names):
    with open(path) as f:
      result = json.load(f)
    env = result['environment']
    versions, device = environment_cells(env)
    for fig in result['figures']:
      met = {True: 'yes', False: '**no**', None: '-'}[fig['met']]
      # `before` was measured on this machine: no before for another's.
      before = fig.get('before') if '@' not in os.path.basename(path) else None
      rows.append(
          f"| {name} | {fig['figure']} | {_fmt(fig['value'])} {fig['unit']} "
          f"| {fig['goal']} | {met} | "
          f"{'-' if before is None else _fmt(before)} | "
          f"{versions} | {device} "
          f"({env['cpu_count']} cores) | `{fig['command']}` |")
    if result.get('notes'):
      notes.append(f'- **{name}**: {result["notes"]}')
  text = ['# Benchmark results', '',
          'Written by `make bench` (`python -m benchmarks`); every value is '
          'a median over interleaved repeats after warm-up (see '
          '`benchmarks/common.py`). `before` is the same figure measured on '
          'the code before the performance changes (`benchmarks/before.json`).'
          ' Details and raw timings are in `<benchmark>.json`.', '',
          *rows, '']
  if notes:
    text += ['## Notes', '', *notes, '']
  path = os.path.join(out_dir, 'README.md')
  with open(path, 'w') as f:
    f.write('\n'.join(text))
  return path
