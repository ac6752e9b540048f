"""Runs the warm-start arms, evaluates them per class, plots and reports."""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from experiments import common

NAME = 'warm_start_resize_head'
GROUPS = ('overall', 'old', 'new')
WORDS = ('above', 'below')


def train_donors(config: ml_collections.ConfigDict, runs_dir: str,
                 cache_dir: str) -> dict[str, Any]:
  """Trains the donor of every seed; returns {'dirs', 'summary'}."""
  dirs, final = {}, []
  for seed in config.seeds:
    dirs[seed] = os.path.join(runs_dir, f'donor_seed{seed}')
    summary = common.train_arm(
        common.arm_config(config.donor, seed, cache_dir=cache_dir), dirs[seed])
    final.append(summary['final_eval_accuracy'])
  return {'dirs': dirs, 'summary': {
      'config': common.describe(config.donor), 'steps': summary['steps'],
      'final_eval_accuracy': final,
      'mean_final_eval_accuracy': common.mean(final)}}


def run_arm(arm: ml_collections.ConfigDict, seed: int, workdir: str,
            cache_dir: str, *, donor: str | None = None,
            init_from: str | None = None) -> dict[str, Any]:
  """Trains one arm for one seed; its eval curve and final numbers."""
  summary = common.train_arm(
      common.arm_config(arm, seed, donor=donor, init_from=init_from,
                        cache_dir=cache_dir), workdir)
  return {'curve': common.scalars(workdir, 'eval_accuracy'),
          'final_eval_accuracy': summary['final_eval_accuracy'],
          'final_eval_loss': summary['final_eval_loss'],
          'train_size': summary['train_size'],
          'test_size': summary['test_size']}


def class_accuracy(predictor: common.Predictor, workdir: str,
                   steps: list[int], groups: dict[str, Any],
                   curve: dict[str, list]) -> tuple[list[dict], float]:
  """Accuracy per group at each step, and the largest difference between the
  overall accuracy predicted here and the trainer's eval at the same steps.

  The trainer does not evaluate the starting step; its predicted accuracy is
  put at the front of `curve` (changed in place).
  """
  at = [predictor.accuracy(workdir, step, groups) for step in steps]
  diffs = [abs(a['overall'] - common.value_at(curve, step))
           for step, a in zip(steps, at) if step in curve['steps']]
  if steps[0] < curve['steps'][0]:
    curve['steps'].insert(0, steps[0])
    curve['values'].insert(0, at[0]['overall'])
  return at, max(diffs, default=0.0)


def mean_at(per_seed: list[list[dict]]) -> list[dict]:
  """The mean over seeds of per-budget group accuracies."""
  return [{g: common.mean([seed[i][g] for seed in per_seed]) for g in GROUPS}
          for i in range(len(per_seed[0]))]


def run(config: ml_collections.ConfigDict, runs_dir: str,
        cache_dir: str) -> dict[str, Any]:
  """Trains the donors and the three arms of every seed; the summary."""
  donors = train_donors(config, runs_dir, cache_dir)
  groups = {'old': list(config.old), 'new': list(config.new)}
  predictor = common.Predictor(tuple(range(10)))
  budgets = list(config.budgets)
  arms, check = {}, 0.0
  for name in config.arm_order:
    per_seed = []
    for seed in config.seeds:
      workdir = os.path.join(runs_dir, f'{name}_seed{seed}')
      result = run_arm(config.arms[name], seed, workdir, cache_dir,
                       donor=donors['dirs'][seed])
      result['at'], diff = class_accuracy(predictor, workdir, budgets, groups,
                                          result['curve'])
      check = max(check, diff)
      per_seed.append(result)
    arms[name] = {
        'label': config.labels[name],
        'config': common.describe(config.arms[name]),
        'per_seed': per_seed,
        'mean_curve': common.mean_curve([r['curve'] for r in per_seed]),
        'mean_at': mean_at([r['at'] for r in per_seed])}
  first = budgets[1]
  return {
      'data': {'train_size': per_seed[0]['train_size'],
               'test_size': per_seed[0]['test_size']},
      'old_classes': list(config.old), 'new_classes': list(config.new),
      'budgets': budgets, 'arm_order': list(config.arm_order),
      'donor': donors['summary'], 'arms': arms,
      'max_abs_diff_prediction_vs_trainer_eval': check,
      'findings': {
          'first_budget': first,
          'resized_minus_scratch': [
              a['overall'] - s['overall'] for a, s in zip(
                  arms['warm_resized']['mean_at'], arms['scratch']['mean_at'])],
          'resized_minus_reinit': [
              a['overall'] - s['overall'] for a, s in zip(
                  arms['warm_resized']['mean_at'],
                  arms['warm_reinit']['mean_at'])],
      }}


def plot(summary: dict[str, Any], results_dir: str) -> None:
  """accuracy.png (eval accuracy against step) and old_new.png (per group)."""
  arms = summary['arms']
  common.plot_curves(
      os.path.join(results_dir, 'accuracy.png'),
      [(arms[n]['label'], arms[n]['mean_curve'],
        [r['curve'] for r in arms[n]['per_seed']])
       for n in summary['arm_order']],
      title=('Ten digits after a donor on '
             f'{common.digits(summary["old_classes"])}: eval accuracy'),
      ylabel='eval accuracy (1,000 test digits)')
  old, new = summary['old_classes'], summary['new_classes']
  series = []
  for color, name in enumerate(summary['arm_order']):
    for group, dashes in (('old', '-'), ('new', '--')):
      curve = {'steps': summary['budgets'],
               'values': [a[group] for a in arms[name]['mean_at']]}
      per_seed = [{'steps': summary['budgets'],
                   'values': [a[group] for a in r['at']]}
                  for r in arms[name]['per_seed']]
      series.append((f'{arms[name]["label"][:3]} {group} digits', curve,
                     per_seed, {'color': f'C{color}', 'ls': dashes,
                                'marker': 'o'}))
  common.plot_curves(os.path.join(results_dir, 'old_new.png'), series,
                     title=(f'Accuracy on old ({common.digits(old)}) and '
                            f'new ({common.digits(new)}) digits'),
                     ylabel='test accuracy within the group')


def budget_table(summary: dict[str, Any], group: str) -> str:
  arms = summary['arms']
  order = summary['arm_order']
  rows = [[step] + [arms[n]['mean_at'][i][group] for n in order]
          for i, step in enumerate(summary['budgets'])]
  return common.table(['step'] + [arms[n]['label'][:3] for n in order], rows)


def render(summary: dict[str, Any]) -> str:
  """report.md from summary.json."""
  arms, order = summary['arms'], summary['arm_order']
  donor = summary['donor']
  target = arms['scratch']['config']
  old, new = summary['old_classes'], summary['new_classes']
  findings = summary['findings']
  i = summary['budgets'].index(findings['first_budget'])
  seeds_rows = [[arms[n]['label']] + [r['final_eval_accuracy']
                                     for r in arms[n]['per_seed']]
                for n in order]
  lines = [
      '# Warm start with a resized head',
      '',
      f'A donor trained on digits {common.digits(old)} (its head has a '
      'column for each) starts a ten-digit run. Does keeping its head columns '
      '(placed by class label) beat re-initializing the head, and both beat '
      'training from '
      'scratch, at small step budgets?',
      '',
      '## Setup',
      '',
      f'- Donor: digits {common.digits(old)}, {donor["steps"]} steps, '
      f'{donor["config"]["optimizer"]}, batch {donor["config"]["batch_size"]}; '
      f'final eval accuracy on its digits '
      f'{common.fmt(donor["mean_final_eval_accuracy"])} (mean over seeds).',
      f'- Target: digits {common.digits(target["classes"])}, {target["steps"]} '
      f'steps, {target["optimizer"]}, batch {target["batch_size"]}; the same '
      'steps, batches and seeds in every arm.',
      '- (a) `warm_start` (the trainer adds the labels of its head '
      '`Dense_1`): every layer from the donor, head columns of digits '
      f'{common.digits(old)} from the donor, columns of '
      f'{common.digits(new)} from the fresh init; fresh optimizer slots, step 0.',
      '- (b) `warm_start` with `exclude=Dense_1/.*`: the head keeps its fresh '
      'init (the same values as in (c)).',
      '- (c) no hooks.',
      '- Accuracy per digit group comes from the checkpoint at each budget, '
      'predicted on the test split here; its overall accuracy differs from '
      'the trainer\'s eval at the same steps by at most '
      f'{common.fmt(summary["max_abs_diff_prediction_vs_trainer_eval"])} '
      '(the plot\'s step-0 point is such a prediction: the trainer does not '
      'evaluate before the first step).',
      '',
      '## Results (mean over seeds)',
      '',
      f'Test accuracy, all ten digits:',
      '',
      budget_table(summary, 'overall'),
      '',
      f'Old digits ({common.digits(old)}):',
      '',
      budget_table(summary, 'old'),
      '',
      f'New digits ({common.digits(new)}):',
      '',
      budget_table(summary, 'new'),
      '',
      '![eval accuracy against step](accuracy.png)',
      '',
      '![old and new digits](old_new.png)',
      '',
      'Final eval accuracy per seed:',
      '',
      common.table(['arm'] + [f'seed {s}' for s in summary['seeds']],
                   seeds_rows),
      '',
      '## Findings',
      '',
      f'- At step {findings["first_budget"]}, (a) is '
      f'{common.signed(findings["resized_minus_scratch"][i], *WORDS)} (c) and '
      f'{common.signed(findings["resized_minus_reinit"][i], *WORDS)} (b); at '
      f'step {summary["budgets"][-1]}, '
      f'{common.signed(findings["resized_minus_scratch"][-1], *WORDS)} (c) '
      f'and {common.signed(findings["resized_minus_reinit"][-1], *WORDS)} '
      '(b).',
      f'- On the new digits at step {findings["first_budget"]}, (a) is at '
      f'{common.fmt(arms["warm_resized"]["mean_at"][i]["new"])} and (b) at '
      f'{common.fmt(arms["warm_reinit"]["mean_at"][i]["new"])}; on the old '
      f'digits, (a) {common.fmt(arms["warm_resized"]["mean_at"][i]["old"])} '
      f'and (b) {common.fmt(arms["warm_reinit"]["mean_at"][i]["old"])}.',
      f'- At step {summary["budgets"][0]}, before any training, (a) already '
      f'classifies the old digits at '
      f'{common.fmt(arms["warm_resized"]["mean_at"][0]["old"])} (b: '
      f'{common.fmt(arms["warm_reinit"]["mean_at"][0]["old"])}); its new '
      f'digits are at {common.fmt(arms["warm_resized"]["mean_at"][0]["new"])}.',
      '',
      common.environment_section(summary),
  ]
  return '\n'.join(lines)

