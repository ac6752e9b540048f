"""Runs the frozen and the fully trainable fine-tune, times both steps."""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from experiments import common
from experiments.warm_start_resize_head import experiment as warm_start_exp
from trainer import run as run_lib


def compare_to_donor(workdir: str, donor_dir: str, keys: tuple[str, ...],
                     step: int | None = None) -> dict[str, Any]:
  """Whether each param of `keys` is bit-identical to the donor's at `step`
  (default: the end of the run)."""
  end, donor = common.state_at(workdir, step), common.state_at(donor_dir)
  out = {}
  for key in keys:
    a, b = end[f'params/{key}'], donor[f'params/{key}']
    out[key] = {'identical': bool(a.dtype == b.dtype and a.shape == b.shape
                                  and np.array_equal(a, b)),
                'max_abs_diff': float(np.abs(a.astype(np.float64) - b).max())}
  return out


def opt_state_elements(workdir: str) -> int:
  """How many numbers the optimizer state holds (frozen params have none)."""
  return int(sum(v.size for k, v in common.state_at(workdir).items()
                 if k.startswith('opt_state/')))


def run_arms(config: ml_collections.ConfigDict, runs_dir: str,
             cache_dir: str) -> dict[str, Any]:
  """Trains the donors and every arm of every seed.

  Returns:
    {'donor', 'donor_dirs', 'arms', 'data'}: per arm its label, config, and
    per seed the eval curve, final numbers and the frozen-tensor check.
  """
  donors = warm_start_exp.train_donors(config, runs_dir, cache_dir)
  arms = {}
  for name in config.arm_order:
    per_seed = []
    for seed in config.seeds:
      workdir = os.path.join(runs_dir, f'{name}_seed{seed}')
      result = warm_start_exp.run_arm(config.arms[name], seed, workdir,
                                      cache_dir, donor=donors['dirs'][seed])
      result['vs_donor'] = compare_to_donor(workdir, donors['dirs'][seed],
                                            tuple(config.frozen_params))
      result['opt_state_elements'] = opt_state_elements(workdir)
      per_seed.append(result)
    curve = common.mean_curve([r['curve'] for r in per_seed])
    arms[name] = {
        'label': config.labels[name],
        'config': common.describe(config.arms[name]),
        'per_seed': per_seed, 'mean_curve': curve,
        'mean_at': [common.value_at(curve, s) for s in config.report_steps],
        'mean_final_eval_accuracy': common.mean(
            [r['final_eval_accuracy'] for r in per_seed])}
  return {'donor': donors['summary'], 'donor_dirs': donors['dirs'],
          'arms': arms, 'report_steps': list(config.report_steps),
          'arm_order': list(config.arm_order),
          'data': {'train_size': per_seed[0]['train_size'],
                   'test_size': per_seed[0]['test_size']}}


def time_steps(config: ml_collections.ConfigDict, runs_dir: str,
               donor_dir: str) -> dict[str, Any]:
  """Times the train step of every arm side by side in this process.

  Each arm's step is the trainer's (`Run.train_step`: metrics summed on
  device, state donated), on its own fresh state; `rounds` rounds run
  `steps_per_round` steps of each arm in turn (the order alternating),
  blocking on the result; the median time per step is kept.
  """
  timing = config.timing
  runs, carries = {}, {}
  for name in config.arm_order:
    arm = common.arm_config(config.arms[name], timing.seed, donor=donor_dir)
    runs[name] = run_lib.Run.prepare(
        arm, os.path.join(runs_dir, f'timing_{name}'))
    carries[name] = (runs[name].fresh_state(), runs[name].empty_metrics())
  first = runs[config.arm_order[0]]
  batch_size = first.setup.schedule.batch_size
  batches = list(itertools.islice(first.train_batches(), 8))

  def run(name: str, count: int, offset: int) -> float:
    start = time.perf_counter()
    for i in range(count):
      carries[name] = runs[name].train_step(
          *carries[name], batches[(offset + i) % len(batches)])
    jax.block_until_ready(carries[name])
    return (time.perf_counter() - start) / count

  for name in config.arm_order:
    run(name, timing.warmup, 0)
  load_before = os.getloadavg()[0]
  times = {name: [] for name in config.arm_order}
  for r in range(timing.rounds):
    order = config.arm_order if r % 2 == 0 else config.arm_order[::-1]
    for name in order:
      times[name].append(run(name, timing.steps_per_round,
                             r * timing.steps_per_round))
  median_ms = {n: float(np.median(t)) * 1e3 for n, t in times.items()}
  q1_ms = {n: float(np.percentile(t, 25)) * 1e3 for n, t in times.items()}
  q3_ms = {n: float(np.percentile(t, 75)) * 1e3 for n, t in times.items()}
  return {'rounds': timing.rounds, 'steps_per_round': timing.steps_per_round,
          'batch_size': batch_size, 'median_step_ms': median_ms,
          'load_average': [load_before, os.getloadavg()[0]],
          'q1_step_ms': q1_ms, 'q3_step_ms': q3_ms}


def run(config: ml_collections.ConfigDict, runs_dir: str,
        cache_dir: str) -> dict[str, Any]:
  """The arms, the frozen-tensor check and the step timing; the summary."""
  summary = run_arms(config, runs_dir, cache_dir)
  donor_dirs = summary.pop('donor_dirs')
  arms = summary['arms']
  frozen = arms['frozen']['per_seed']
  summary['frozen_bit_identical'] = all(
      v['identical'] for r in frozen for v in r['vs_donor'].values())
  summary['trainable_max_abs_diff'] = {
      key: max(r['vs_donor'][key]['max_abs_diff']
               for r in arms['all_trainable']['per_seed'])
      for key in config.frozen_params}
  summary['final_gap'] = (arms['frozen']['mean_final_eval_accuracy']
                          - arms['all_trainable']['mean_final_eval_accuracy'])
  timing = time_steps(config, runs_dir, donor_dirs[config.timing.seed])
  ms = timing['median_step_ms']
  timing['speedup'] = ms['all_trainable'] / ms['frozen']
  timing['time_saved'] = 1.0 - ms['frozen'] / ms['all_trainable']
  timing['trainer_examples_per_sec'] = {
      name: common.mean([
          common.trainer_summary(os.path.join(runs_dir, f'{name}_seed{seed}'))
          ['train_examples_per_sec'] for seed in config.seeds])
      for name in config.arm_order}
  summary['timing'] = timing
  return summary


def plot(summary: dict[str, Any], results_dir: str, title: str = '',
         vlines: tuple = ()) -> None:
  """accuracy.png: eval accuracy against step, every arm."""
  arms = summary['arms']
  title = title or (
      'Fine-tune from a '
      f'{common.digits(summary["donor"]["config"]["classes"])} donor: '
      'frozen convolutions')
  common.plot_curves(
      os.path.join(results_dir, 'accuracy.png'),
      [(arms[n]['label'], arms[n]['mean_curve'],
        [r['curve'] for r in arms[n]['per_seed']])
       for n in summary['arm_order']],
      title=title, ylabel='eval accuracy (1,000 test digits)', vlines=vlines)


def accuracy_table(summary: dict[str, Any]) -> str:
  """Mean eval accuracy of every arm at the report steps."""
  arms = summary['arms']
  return common.table(
      ['arm'] + [f'step {s}' for s in summary['report_steps']],
      [[arms[n]['label']] + arms[n]['mean_at'] for n in summary['arm_order']])


def seeds_table(summary: dict[str, Any]) -> str:
  arms = summary['arms']
  return common.table(
      ['arm'] + [f'seed {s}' for s in summary['seeds']],
      [[arms[n]['label']] + [r['final_eval_accuracy']
                             for r in arms[n]['per_seed']]
       for n in summary['arm_order']])


def render(summary: dict[str, Any]) -> str:
  """report.md from summary.json."""
  arms = summary['arms']
  donor = summary['donor']
  target = arms['all_trainable']['config']
  timing = summary['timing']
  ms = timing['median_step_ms']
  identity_rows = [
      [key, all(r['vs_donor'][key]['identical']
                for r in arms['frozen']['per_seed']),
       max(r['vs_donor'][key]['max_abs_diff']
           for r in arms['frozen']['per_seed']),
       summary['trainable_max_abs_diff'][key]]
      for key in summary['trainable_max_abs_diff']]
  lines = [
      '# Fine-tuning with a frozen backbone',
      '',
      'A ten-digit model warm-started from a donor on digits '
      f'{common.digits(donor["config"]["classes"])} trains with Conv_0 and '
      'Conv_1 frozen (`config.freeze.patterns`), against the same warm start '
      'with everything trainable.',
      '',
      '## Setup',
      '',
      f'- Donor: digits {common.digits(donor["config"]["classes"])}, '
      f'{donor["steps"]} steps, {donor["config"]["optimizer"]}; final eval '
      f'accuracy {common.fmt(donor["mean_final_eval_accuracy"])} (mean over '
      'seeds).',
      f'- Both arms: digits {common.digits(target["classes"])}, '
      f'{target["steps"]} steps, {target["optimizer"]}, batch '
      f'{target["batch_size"]}, `warm_start` from the donor with the head '
      'resized by class map (fresh optimizer slots); the same steps, batches '
      'and seeds.',
      f'- Frozen arm: `config.freeze.patterns = '
      f'{arms["frozen"]["config"]["freeze"]}`.',
      '',
      '## Accuracy (mean over seeds)',
      '',
      accuracy_table(summary),
      '',
      f'Final eval accuracy per seed:',
      '',
      seeds_table(summary),
      '',
      '![eval accuracy against step](accuracy.png)',
      '',
      f'The frozen arm ends {common.signed(summary["final_gap"], "above", "below")} '
      'the fully trainable one (mean final eval accuracy).',
      '',
      '## Frozen tensors against the donor',
      '',
      common.table(['param', 'frozen arm: bit-identical (every seed)',
                    'frozen arm: max abs diff',
                    'trainable arm: max abs diff'], identity_rows),
      '',
      f'Every frozen tensor bit-identical to the donor\'s at the end: '
      f'{common.fmt(summary["frozen_bit_identical"])}. Optimizer state: '
      f'{arms["frozen"]["per_seed"][0]["opt_state_elements"]} numbers with '
      f'the convolutions frozen, '
      f'{arms["all_trainable"]["per_seed"][0]["opt_state_elements"]} with '
      'everything trainable (frozen params carry no slots).',
      '',
      '## Step time (measured: varies from run to run)',
      '',
      'Both train steps, jitted as the trainer jits them, timed side by side '
      f'in one process: {timing["rounds"]} rounds of '
      f'{timing["steps_per_round"]} steps of each arm in turn (order '
      f'alternating), batch {timing["batch_size"]}, after a warm-up. The '
      'machine\'s 1-minute load average was '
      f'{common.fmt(timing["load_average"][0])} before and '
      f'{common.fmt(timing["load_average"][1])} after (other work on the '
      'machine falls on both arms alike, as they are interleaved).',
      '',
      common.table(['arm', 'median ms/step', 'quartiles ms/step',
                    'trainer examples/s (separate runs)'],
                   [[arms[n]['label'], ms[n],
                     f'{common.fmt(timing["q1_step_ms"][n])} - '
                     f'{common.fmt(timing["q3_step_ms"][n])}',
                     timing['trainer_examples_per_sec'][n]]
                    for n in summary['arm_order']]),
      '',
      f'The frozen step is {common.fmt(timing["speedup"])} times as fast '
      f'(it saves {common.fmt(timing["time_saved"])} of the step time): the '
      'frozen params\' gradients are unused, so XLA drops the backward pass '
      'through both convolutions.',
      '',
      common.environment_section(summary),
  ]
  return '\n'.join(lines)
