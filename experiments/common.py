"""What the experiments share: run arms, read their curves, plot, report.

An experiment is a package `experiments/<name>/` with `config.py`
(`get_config(tiny)`) and `experiment.py` (`run`, `plot`, `render`). `execute`
runs it into `<results_dir>` (default `experiments/<name>/results/`): the
arms train in `runs/` (not committed), `run` returns the summary, which is
written to `summary.json` and read back; the plots and `report.md` are made
from what was read back, so every number in a report is one of summary.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import json
import os
import shutil
import sys
from typing import Any, Sequence

from absl import logging
import ml_collections
import numpy as np

import hooks
from trainer import checkpoint
from trainer import data as data_lib
from trainer import host
from trainer import run as run_lib
from trainer import train

EXPERIMENTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(EXPERIMENTS_DIR)
LEGACY_ADAM = os.path.join(os.path.dirname(REPO), 'shared', 'fixtures',
                           'legacy_flax_optim', 'adam', 'checkpoint_20')
NAMES = ('warm_start_resize_head', 'freeze_backbone', 'gradual_unfreeze',
         'migrate_legacy', 'resume_changed_config')
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'clu',
            'numpy', 'tensorflow-cpu', 'matplotlib')


# Configs.

def embedded(config: ml_collections.ConfigDict, *, classes: Sequence[int],
             steps: int, eval_every: int, checkpoint_every: int,
             keep: int = 3) -> ml_collections.ConfigDict:
  """Sets what every experiment run shares: embedded data, a step count, no bar.

  Args:
    config: a run config (configs/default.py's or a variant).
    classes: the digits to train on.
    steps: config.num_train_steps.
    eval_every: config.eval_every_steps.
    checkpoint_every: config.checkpoint_every_steps.
    keep: config.keep_checkpoints.

  Returns:
    `config`, changed in place.
  """
  config.data_source = 'embedded'
  config.classes = tuple(classes)
  config.num_train_steps = steps
  config.eval_every_steps = eval_every
  config.log_every_steps = eval_every
  config.checkpoint_every_steps = checkpoint_every
  config.keep_checkpoints = keep
  config.progress_bar = 'off'
  return config


def hook(name: str, **params: Any) -> ml_collections.ConfigDict:
  """One hook entry of config.hooks.post_init or pre_restore."""
  return ml_collections.ConfigDict({'name': name, **params})


def arm_config(config: ml_collections.ConfigDict, seed: int,
               donor: str | None = None, init_from: str | None = None,
               cache_dir: str = '') -> ml_collections.ConfigDict:
  """A copy of an arm's config for one seed, its donor and init_from filled in.

  Args:
    config: the arm's config from the experiment config.
    seed: config.seed.
    donor: the workdir every post_init hook with a `donor` field reads.
    init_from: config.init_from.
    cache_dir: config.compilation_cache_dir ('' = off).

  Returns:
    The run config.
  """
  config = copy.deepcopy(config)
  config.seed = seed
  config.compilation_cache_dir = cache_dir
  if init_from is not None:
    config.init_from = init_from
  for entry in config.hooks.post_init:
    if 'donor' in entry:
      entry.donor = donor
  return config


def describe(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The fields of a run config that tell arms apart, for the summary."""
  return {
      'classes': list(config.classes),
      'steps': config.num_train_steps,
      'batch_size': config.batch_size,
      'optimizer': (f'{config.optimizer.name} lr {config.optimizer.learning_rate}'
                    + (f' momentum {config.optimizer.momentum}'
                       if config.optimizer.name == 'sgd' else '')),
      'post_init': [dict(e) for e in config.hooks.to_dict()['post_init']],
      'pre_restore': [dict(e) for e in config.hooks.to_dict()['pre_restore']],
      'init_from': (os.path.relpath(config.init_from, REPO)
                    if config.init_from else ''),
      'freeze': list(config.freeze.patterns),
      'unfreeze_steps': list(config.freeze.unfreeze_steps),
  }


# Runs and what they leave.

def train_arm(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains one arm in a fresh `workdir` (an old one is removed first).

  Args:
    config: the run config.
    workdir: the run's workdir.

  Returns:
    The trainer's summary.
  """
  shutil.rmtree(workdir, ignore_errors=True)
  with contextlib.redirect_stdout(io.StringIO()):  # The surgery table.
    summary = train.train_and_evaluate(config, workdir)
  print(f'{os.path.basename(workdir)}: step {summary["steps"]}, eval accuracy '
        f'{summary["final_eval_accuracy"]:.4f}', file=sys.stderr)
  return summary


def trainer_summary(workdir: str) -> dict[str, Any]:
  """The summary.json the trainer wrote in `workdir`."""
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)


def scalars(workdir: str, tag: str) -> dict[str, list]:
  """A TensorBoard scalar of a run: {'steps': [...], 'values': [...]}."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(
      workdir, size_guidance={event_accumulator.TENSORS: 0})
  events.Reload()
  points = {e.step: float(tensor_util.make_ndarray(e.tensor_proto))
            for e in events.Tensors(tag)}
  return {'steps': sorted(points), 'values': [points[s] for s in sorted(points)]}


def value_at(curve: dict[str, list], step: int) -> float:
  """The value of a curve at `step`; KeyError names the steps there are."""
  if step not in curve['steps']:
    raise KeyError(f'step {step} is not in the curve; it has {curve["steps"]}')
  return curve['values'][curve['steps'].index(step)]


def mean(values: Sequence[float]) -> float:
  return float(np.mean(np.asarray(values, np.float64)))


def mean_curve(curves: Sequence[dict[str, list]]) -> dict[str, list]:
  """The mean over seeds of curves with the same steps."""
  steps = curves[0]['steps']
  for curve in curves:
    if curve['steps'] != steps:
      raise ValueError(f'curves differ in steps: {steps} vs {curve["steps"]}')
  return {'steps': steps,
          'values': [mean(v) for v in zip(*(c['values'] for c in curves))]}


def state_at(workdir: str, step: int | None = None) -> dict[str, np.ndarray]:
  """A run's flat state at `step` (default: the latest), as numpy arrays."""
  step = checkpoint.latest_step(workdir) if step is None else step
  raw = checkpoint.read_raw(checkpoint.directory(workdir), step)
  return {k: np.asarray(v) for k, v in hooks.flatten_raw(raw).items()}


def reopen(workdir: str) -> run_lib.Run:
  """The `Run` of a trained arm, prepared with the config it stored.

  Args:
    workdir: the arm's workdir.

  Returns:
    The run: its `restore(step)` reads any of the workdir's checkpoints.
  """
  ckpt_dir = checkpoint.directory(workdir)
  stored = checkpoint.read_json(ckpt_dir, checkpoint.latest_step(workdir),
                                'config')
  return run_lib.Run.prepare(ml_collections.ConfigDict(stored), workdir)


class Predictor:
  """Predicts the embedded test split with the checkpoints of trained arms."""

  def __init__(self, classes: Sequence[int], batch_size: int = 500):
    self.classes = tuple(classes)
    self.test = data_lib.load('embedded', '', self.classes).test
    self._batch_size = batch_size
    self._runs: dict[str, run_lib.Run] = {}

  def _run(self, workdir: str) -> run_lib.Run:
    if workdir not in self._runs:
      run = reopen(workdir)
      if run.setup.classes != self.classes:
        raise ValueError(f'{workdir} was trained on classes '
                         f'{list(run.setup.classes)}, not the predictor\'s '
                         f'{list(self.classes)}.')
      self._runs[workdir] = run
    return self._runs[workdir]

  def labels(self, workdir: str, step: int) -> np.ndarray:
    """Predicted labels (0..k-1) of the test split at checkpoint `step`."""
    run = self._run(workdir)
    return run.predict(run.restore(step), self.test.images, self._batch_size)

  def accuracy(self, workdir: str, step: int,
               groups: dict[str, Sequence[int]]) -> dict[str, float]:
    """Accuracy overall and on the test digits of each group of `groups`."""
    predicted = self.labels(workdir, step)
    correct = predicted == self.test.labels
    digits = np.asarray(self.classes)[self.test.labels]
    out = {'overall': float(correct.mean())}
    for name, members in groups.items():
      out[name] = float(correct[np.isin(digits, members)].mean())
    return out


# The files an experiment writes.


def fmt(value: Any) -> str:
  """How a report writes a number: floats with four decimals."""
  if isinstance(value, bool):
    return 'yes' if value else 'no'
  if isinstance(value, float):
    return f'{value:.4f}'
  if isinstance(value, (list, tuple)):
    return ', '.join(fmt(v) for v in value)
  return str(value)


def digits(values: Sequence[int]) -> str:
  """Digits as a report writes them: '0-4' for a run, else '0, 2, 7'."""
  values = list(values)
  if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
    return f'{values[0]}-{values[-1]}'
  return fmt(values)


def signed(value: float, above: str = 'above', below: str = 'below') -> str:
  """|value| and whether it is above or below (or level)."""
  word = above if value > 0 else below if value < 0 else 'level'
  return f'{fmt(abs(value))} {word}'


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A markdown table; cells go through `fmt`."""
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '|'.join('---' for _ in header) + '|']
  lines += ['| ' + ' | '.join(fmt(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines)


def environment_section(summary: dict[str, Any]) -> str:
  """The report's closing section: machine, versions, seeds, the command."""
  env = summary['environment']
  versions = ', '.join(f'{k} {v}' for k, v in env['versions'].items())
  tiny = ' --tiny' if summary['tiny'] else ''
  return '\n'.join([
      '## Machine, versions, seeds',
      '',
      f'- Machine: {env["cpu"]}, {env["cpu_count"]} CPU cores, '
      f'{env["platform"]}; JAX backend {env["jax_backend"]} '
      f'({env["device_count"]} device, {env["device_kind"]}).',
      f'- Python {env["python"]}; {versions}.',
      f'- Seeds: {fmt(summary["seeds"])} (every arm runs every seed; a seed '
      'fixes the fresh init and the order of the batches).',
      f'- Data: the embedded MNIST split ({summary["data"]["train_size"]} '
      f'train / {summary["data"]["test_size"]} test digits over ten classes).',
      f'- Command: `python -m experiments.{summary["experiment"]}{tiny}` '
      f'(or `make experiment NAME={summary["experiment"]}`). On CPU the runs '
      'are deterministic: a rerun writes the same numbers.',
      ''])


def plot_curves(path: str, series: Sequence[tuple[Any, ...]], *, title: str,
                ylabel: str, xlabel: str = 'step',
                vlines: Sequence[tuple[float, str]] = ()) -> None:
  """Plots one mean line per arm, the seeds' spread shaded, to a PNG.

  Args:
    path: the PNG to write.
    series: (label, mean curve, the curve of each seed[, matplotlib style
      dict]) per line.
    title: the plot title.
    ylabel: the y axis label.
    xlabel: the x axis label.
    vlines: (x, label) vertical lines, e.g. a phase change.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for label, curve, seeds, *style in series:
    line, = ax.plot(curve['steps'], curve['values'], label=label,
                    **{'lw': 1.8, **(style[0] if style else {})})
    if len(seeds) > 1:
      values = np.asarray([s['values'] for s in seeds])
      ax.fill_between(curve['steps'], values.min(0), values.max(0),
                      color=line.get_color(), alpha=0.15, lw=0)
  for x, label in vlines:
    ax.axvline(x, color='k', ls='--', lw=1, label=label)
  ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110, metadata={'Software': None})
  plt.close(fig)


def _module(name: str, part: str) -> Any:
  if name not in NAMES:
    raise KeyError(f'unknown experiment {name!r}; known: {list(NAMES)}')
  return importlib.import_module(f'experiments.{name}.{part}')


def results_dir_of(name: str) -> str:
  return os.path.join(EXPERIMENTS_DIR, name, 'results')


def execute(name: str, *, tiny: bool = False, results_dir: str | None = None,
            cache_dir: str = '') -> dict[str, Any]:
  """Runs experiment `name` and writes summary.json, the plots and report.md.

  Args:
    name: one of NAMES.
    tiny: a few steps of each arm, one seed (for tests).
    results_dir: where the results go; default experiments/<name>/results.
    cache_dir: a JAX persistent compilation cache for every run ('' = off).

  Returns:
    The summary, as read back from summary.json.
  """
  config = _module(name, 'config').get_config(tiny=tiny)
  experiment = _module(name, 'experiment')
  results_dir = results_dir or results_dir_of(name)
  runs_dir = os.path.join(results_dir, 'runs')
  shutil.rmtree(runs_dir, ignore_errors=True)
  os.makedirs(runs_dir)
  summary = {'experiment': name, 'tiny': tiny, 'seeds': list(config.seeds)}
  summary.update(experiment.run(config, runs_dir, cache_dir))
  summary['environment'] = host.environment(PACKAGES)
  path = os.path.join(results_dir, 'summary.json')
  with open(path, 'w') as f:
    json.dump(summary, f, indent=1)
    f.write('\n')
  with open(path) as f:
    summary = json.load(f)
  experiment.plot(summary, results_dir)
  with open(os.path.join(results_dir, 'report.md'), 'w') as f:
    f.write(experiment.render(summary))
  return summary


def main(name: str, argv: Sequence[str] | None = None) -> int:
  """The command line of `python -m experiments.<name>`."""
  parser = argparse.ArgumentParser(prog=f'python -m experiments.{name}',
                                   description=_module(name, 'config').__doc__)
  parser.add_argument('--tiny', action='store_true',
                      help='a few steps per arm and one seed (a smoke run)')
  parser.add_argument('--results_dir', default=None,
                      help=f'default: {results_dir_of(name)}')
  parser.add_argument('--compilation_cache_dir', default='',
                      help='JAX persistent compilation cache for the runs')
  args = parser.parse_args(argv)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  # Orbax warns on every read-only checkpoint reader; errors still show.
  logging.set_verbosity(logging.ERROR)
  summary = execute(name, tiny=args.tiny, results_dir=args.results_dir,
                    cache_dir=args.compilation_cache_dir)
  where = args.results_dir or results_dir_of(name)
  print(f'{name}: report in {os.path.join(where, "report.md")}', file=sys.stderr)
  del summary
  return 0
