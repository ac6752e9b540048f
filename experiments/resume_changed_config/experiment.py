"""Continues the 0-4 donor under ten digits; compares with the warm start."""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np

from experiments import common
from experiments.warm_start_resize_head import experiment as warm_start_exp


def _shift(curve: dict[str, list], offset: int) -> dict[str, list]:
  return {'steps': [s - offset for s in curve['steps']],
          'values': curve['values']}


def start_states(resume_dir: str, warm_dir: str,
                 step: int) -> dict[str, Any]:
  """Compares the first checkpoints of the resumed and warm-started arms."""
  a, b = common.state_at(resume_dir, step), common.state_at(warm_dir, step)
  params = [k for k in a if k.startswith('params/')]
  slots = [k for k in a if '/trace/' in k]
  norm = lambda s: float(np.sqrt(sum(np.sum(s[k].astype(np.float64) ** 2)
                                     for k in slots)))
  return {'params_identical': all(np.array_equal(a[k], b[k]) for k in params),
          'resume_momentum_l2': norm(a), 'warm_momentum_l2': norm(b)}


def run(config: ml_collections.ConfigDict, runs_dir: str,
        cache_dir: str) -> dict[str, Any]:
  """Trains the donors and the three arms of every seed; the summary."""
  donors = warm_start_exp.train_donors(config, runs_dir, cache_dir)
  donor_steps = config.donor.num_train_steps
  groups = {'old': list(config.old), 'new': list(config.new)}
  predictor = common.Predictor(tuple(range(10)))
  budgets = list(config.budgets)
  arms, check, starts = {}, 0.0, []
  for name in config.arm_order:
    offset = 0 if name == 'warm_step_0' else donor_steps
    per_seed = []
    for seed in config.seeds:
      workdir = os.path.join(runs_dir, f'{name}_seed{seed}')
      donor = donors['dirs'][seed]
      result = warm_start_exp.run_arm(
          config.arms[name], seed, workdir, cache_dir, donor=donor,
          init_from=donor if name == 'resume' else None)
      at, diff = warm_start_exp.class_accuracy(
          predictor, workdir, [offset + b for b in budgets], groups,
          result['curve'])
      result['at'], result['curve'] = at, _shift(result['curve'], offset)
      check = max(check, diff)
      per_seed.append(result)
    arms[name] = {
        'label': config.labels[name], 'start_step': offset,
        'config': common.describe(config.arms[name]),
        'per_seed': per_seed,
        'mean_curve': common.mean_curve([r['curve'] for r in per_seed]),
        'mean_at': warm_start_exp.mean_at([r['at'] for r in per_seed]),
        'final_seed_spread': float(
            np.ptp([r['final_eval_accuracy'] for r in per_seed]))}
  for seed in config.seeds:
    starts.append(start_states(
        os.path.join(runs_dir, f'resume_seed{seed}'),
        os.path.join(runs_dir, f'warm_donor_step_seed{seed}'), donor_steps))
  resume = arms['resume']['mean_at']
  return {
      'data': {'train_size': per_seed[0]['train_size'],
               'test_size': per_seed[0]['test_size']},
      'old_classes': list(config.old), 'new_classes': list(config.new),
      'budgets': budgets, 'arm_order': list(config.arm_order),
      'donor': donors['summary'], 'arms': arms,
      'max_abs_diff_prediction_vs_trainer_eval': check,
      'start': {
          'params_identical': all(s['params_identical'] for s in starts),
          'resume_momentum_l2': common.mean(
              [s['resume_momentum_l2'] for s in starts]),
          'warm_momentum_l2': common.mean(
              [s['warm_momentum_l2'] for s in starts])},
      'findings': {
          name: {g: [a[g] - b[g] for a, b in zip(resume, arms[name]['mean_at'])]
                 for g in warm_start_exp.GROUPS}
          for name in config.arm_order if name != 'resume'}}


def plot(summary: dict[str, Any], results_dir: str) -> None:
  """accuracy.png: eval accuracy against steps since the start."""
  arms = summary['arms']
  common.plot_curves(
      os.path.join(results_dir, 'accuracy.png'),
      [(arms[n]['label'], arms[n]['mean_curve'],
        [r['curve'] for r in arms[n]['per_seed']])
       for n in summary['arm_order']],
      title=(f'A {common.digits(summary["old_classes"])} run continued under '
             'ten digits'),
      xlabel='steps since the start of the ten-digit run',
      ylabel='eval accuracy (1,000 test digits)')


def render(summary: dict[str, Any]) -> str:
  """report.md from summary.json."""
  arms, order = summary['arms'], summary['arm_order']
  donor, start = summary['donor'], summary['start']
  old, new = summary['old_classes'], summary['new_classes']
  resume = arms['resume']
  f = summary['findings']
  budgets = summary['budgets']
  gap_rows = [[b] + [f[name][g][i] for name in order[1:]
                     for g in ('overall', 'old', 'new')]
              for i, b in enumerate(budgets)]
  lines = [
      '# Resuming under a changed config',
      '',
      f'A run on digits {common.digits(old)} is continued under a ten-digit '
      'config in a new workdir: `config.init_from` names its workdir and the '
      'pre_restore hook `resize_head` gives the head columns for the new '
      'digits; '
      'the step and the optimizer state (SGD momentum) are carried. Does that '
      'beat experiment 1\'s warm start, which keeps the donor\'s params but '
      'starts the momentum from zero?',
      '',
      '## Setup',
      '',
      f'- Donor: digits {common.digits(old)}, {donor["steps"]} steps, '
      f'{donor["config"]["optimizer"]}, batch '
      f'{donor["config"]["batch_size"]}; final eval accuracy '
      f'{common.fmt(donor["mean_final_eval_accuracy"])} (mean over seeds).',
      f'- (a) `init_from` the donor, pre_restore '
      f'`{resume["config"]["pre_restore"]}`: steps {resume["start_step"]} to '
      f'{resume["config"]["steps"]}.',
      f'- (b) `warm_start` (head `Dense_1` by class label) with '
      f'`step=donor`: steps '
      f'{arms["warm_donor_step"]["start_step"]} to '
      f'{arms["warm_donor_step"]["config"]["steps"]}, the same batches as (a).',
      f'- (c) experiment 1\'s arm (a): the same hook with `step=reset`, steps '
      f'{arms["warm_step_0"]["start_step"]} to '
      f'{arms["warm_step_0"]["config"]["steps"]} (other batches).',
      f'- All: digits {common.digits(resume["config"]["classes"])}, '
      f'{resume["config"]["optimizer"]}, batch '
      f'{resume["config"]["batch_size"]}; the new head columns of (a), (b) and '
      '(c) are the same fresh init.',
      f'- At the start (a) and (b) hold bit-identical params: '
      f'{common.fmt(start["params_identical"])}; the momentum differs: L2 norm '
      f'{common.fmt(start["resume_momentum_l2"])} in (a), '
      f'{common.fmt(start["warm_momentum_l2"])} in (b).',
      '- Accuracy per digit group comes from the checkpoints at each budget, '
      'predicted on the test split here (largest difference from the '
      'trainer\'s eval: '
      f'{common.fmt(summary["max_abs_diff_prediction_vs_trainer_eval"])}; the '
      'plot\'s first point is such a prediction).',
      '',
      '## Results (mean over seeds; steps since the start)',
      '',
      'Test accuracy, all ten digits:',
      '',
      warm_start_exp.budget_table(summary, 'overall'),
      '',
      f'Old digits ({common.digits(old)}):',
      '',
      warm_start_exp.budget_table(summary, 'old'),
      '',
      f'New digits ({common.digits(new)}):',
      '',
      warm_start_exp.budget_table(summary, 'new'),
      '',
      '![eval accuracy against steps since the start](accuracy.png)',
      '',
      '(a) minus (b) and (a) minus (c), overall / old / new:',
      '',
      common.table(['step'] + [f'{p} {g}' for p in ('a-b', 'a-c')
                               for g in ('overall', 'old', 'new')], gap_rows),
      '',
      'Final eval accuracy per seed:',
      '',
      common.table(['arm'] + [f'seed {s}' for s in summary['seeds']],
                   [[arms[n]['label'][:3]] + [r['final_eval_accuracy']
                                              for r in arms[n]['per_seed']]
                    for n in order]),
      '',
      '## Findings',
      '',
      f'- At step {budgets[1]} after the start (a) is '
      f'{common.signed(f["warm_donor_step"]["overall"][1], "above", "below")} '
      f'(b) and {common.signed(f["warm_step_0"]["overall"][1], "above", "below")} '
      f'(c); at step {budgets[-1]}, '
      f'{common.signed(f["warm_donor_step"]["overall"][-1], "above", "below")} '
      f'(b) and {common.signed(f["warm_step_0"]["overall"][-1], "above", "below")} '
      '(c).',
      '- For scale: the final eval accuracies of the seeds spread over '
      + ', '.join(f'{common.fmt(arms[n]["final_seed_spread"])} in '
                  f'{arms[n]["label"][:3]}' for n in order) + '.',
      '',
      common.environment_section(summary),
  ]
  return '\n'.join(lines)
