"""Runs the gradual unfreeze against experiment 2's arms; plots the phase change."""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from experiments import common
from experiments.freeze_backbone import experiment as freeze_exp


def run(config: ml_collections.ConfigDict, runs_dir: str,
        cache_dir: str) -> dict[str, Any]:
  """Trains the donors and the four arms of every seed; the summary."""
  summary = freeze_exp.run_arms(config, runs_dir, cache_dir)
  donor_dirs = summary.pop('donor_dirs')
  arms, n = summary['arms'], config.unfreeze_step
  keys = tuple(config.frozen_params)
  at_n = [freeze_exp.compare_to_donor(
      os.path.join(runs_dir, f'gradual_seed{seed}'), donor_dirs[seed], keys,
      step=n) for seed in config.seeds]

  def identical(results: list[dict], want: bool) -> bool:
    return all(v['identical'] == want for r in results for v in r.values())

  summary['checks'] = {
      'gradual_body_identical_at_n': identical(at_n, True),
      'gradual_body_changed_at_end': identical(
          [r['vs_donor'] for r in arms['gradual']['per_seed']], False),
      'head_only_body_identical_at_end': identical(
          [r['vs_donor'] for r in arms['head_only']['per_seed']], True)}
  summary['unfreeze_step'] = n
  summary['after'] = list(config.after)
  summary['gain_after_n'] = {
      name: [common.value_at(arms[name]['mean_curve'], n + a)
             - common.value_at(arms[name]['mean_curve'], n)
             for a in config.after] for name in config.arm_order}
  gradual = arms['gradual']['mean_final_eval_accuracy']
  summary['gradual_final_minus'] = {
      name: gradual - arms[name]['mean_final_eval_accuracy']
      for name in config.arm_order if name != 'gradual'}
  return summary


def plot(summary: dict[str, Any], results_dir: str) -> None:
  """accuracy.png with the unfreeze step as a vertical line."""
  freeze_exp.plot(summary, results_dir,
                  title='Head only, then everything trainable at step N',
                  vlines=[(summary['unfreeze_step'],
                           f'unfreeze (N = {summary["unfreeze_step"]})')])


def render(summary: dict[str, Any]) -> str:
  """report.md from summary.json."""
  arms, order = summary['arms'], summary['arm_order']
  n, checks = summary['unfreeze_step'], summary['checks']
  donor = summary['donor']
  target = arms['gradual']['config']
  minus = summary['gradual_final_minus']
  patterns = ', '.join(f'`{p}`' for p in target['freeze'])
  lines = [
      '# Gradual unfreezing',
      '',
      f'The head (Dense_1) trains alone for {n} steps with '
      f'{patterns} frozen; at step N = {n} everything '
      'unfreezes (`config.freeze.unfreeze_steps`). Against the arms of '
      'experiment 2, rerun here, and the head trained alone throughout.',
      '',
      '## Setup',
      '',
      f'- Donor: digits {common.digits(donor["config"]["classes"])}, '
      f'{donor["steps"]} steps, {donor["config"]["optimizer"]}; final eval '
      f'accuracy {common.fmt(donor["mean_final_eval_accuracy"])} (mean over '
      'seeds).',
      f'- Every arm: digits {common.digits(target["classes"])}, '
      f'{target["steps"]} steps, {target["optimizer"]}, batch '
      f'{target["batch_size"]}, `warm_start` from the donor with the head '
      'resized by class map; the same steps, batches and seeds.',
      '- At the phase change the optimizer is rebuilt: the head\'s momentum '
      'carries over, the newly trainable params start with fresh slots.',
      '',
      '## Accuracy (mean over seeds)',
      '',
      freeze_exp.accuracy_table(summary),
      '',
      '![eval accuracy against step, the unfreeze step dashed](accuracy.png)',
      '',
      f'Change of eval accuracy from step N = {n} to N + k:',
      '',
      common.table(['arm'] + [f'k = {a}' for a in summary['after']],
                   [[arms[name]['label']] + summary['gain_after_n'][name]
                    for name in order]),
      '',
      'Final eval accuracy per seed:',
      '',
      freeze_exp.seeds_table(summary),
      '',
      '## Findings',
      '',
      f'- At the end the gradual arm is '
      + '; '.join(f'{common.signed(minus[name], "above", "below")} '
                  f'{arms[name]["label"]}' for name in order
                  if name != 'gradual') + ' (mean final eval accuracy).',
      f'- The gradual arm\'s {patterns} are bit-identical '
      f'to the donor\'s at step N: {common.fmt(checks["gradual_body_identical_at_n"])}; '
      f'all of them changed by the end: '
      f'{common.fmt(checks["gradual_body_changed_at_end"])}. The head-only '
      'arm\'s are bit-identical at the end: '
      f'{common.fmt(checks["head_only_body_identical_at_end"])}.',
      '',
      common.environment_section(summary),
  ]
  return '\n'.join(lines)
