"""Continues the legacy checkpoint with carried and with fresh Adam slots."""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np

import hooks
from experiments import common
from trainer import run as run_lib


def first_update(config: ml_collections.ConfigDict, workdir: str,
                 step: int) -> dict[str, float]:
  """Redoes the first step after the restore; the size of its update.

  The state at `step` (the restore) is read from the run's checkpoint and
  the trainer's train step (`Run.train_step`) is applied to the run's batch
  of that step.

  Returns:
    The update's L2 norm, its mean and largest |element| over the learning
    rate, and the loss after it on the next batch (the trainer logs the same
    loss at step + 2).
  """
  run = run_lib.Run.prepare(config, workdir)
  state = run.restore(step)
  before = {k: np.asarray(v) for k, v in hooks.flatten(state.params).items()}
  batches = run.train_batches(step)
  state, _ = run.train_step(state, run.empty_metrics(), next(batches))
  after = {k: np.asarray(v) for k, v in hooks.flatten(state.params).items()}
  delta = np.concatenate([(after[k].astype(np.float64) - before[k]).ravel()
                          for k in sorted(before)])
  _, totals = run.train_step(state, run.empty_metrics(), next(batches))
  lr = config.optimizer.learning_rate
  return {'l2': float(np.sqrt(np.sum(delta ** 2))),
          'mean_abs_over_lr': float(np.abs(delta).mean() / lr),
          'max_abs_over_lr': float(np.abs(delta).max() / lr),
          'next_loss': float(jax.device_get(totals.compute())['loss'])}


def run(config: ml_collections.ConfigDict, runs_dir: str,
        cache_dir: str) -> dict[str, Any]:
  """Trains both arms for every seed; the losses after the restore."""
  if not os.path.exists(config.legacy):
    raise FileNotFoundError(
        f'the legacy flax.optim fixture is not at {config.legacy}; it ships '
        'in shared/fixtures/legacy_flax_optim/adam next to the repository.')
  start = config.legacy_step
  table_steps = list(range(start + 1, start + 1 + config.table_steps))
  arms = {}
  for name in config.arm_order:
    per_seed = []
    for seed in config.seeds:
      workdir = os.path.join(runs_dir, f'{name}_seed{seed}')
      arm = common.arm_config(config.arms[name], seed, cache_dir=cache_dir)
      summary = common.train_arm(arm, workdir)
      loss = common.scalars(workdir, 'train_loss')
      per_seed.append({
          'curve': common.scalars(workdir, 'eval_accuracy'),
          'loss': {'steps': loss['steps'][:config.plot_steps],
                   'values': loss['values'][:config.plot_steps]},
          'final_eval_accuracy': summary['final_eval_accuracy'],
          'final_eval_loss': summary['final_eval_loss'],
          'first_update': first_update(arm, workdir, start)})
    loss = common.mean_curve([r['loss'] for r in per_seed])
    arms[name] = {
        'label': config.labels[name],
        'config': common.describe(config.arms[name]),
        'per_seed': per_seed,
        'mean_curve': common.mean_curve([r['curve'] for r in per_seed]),
        'mean_loss': loss,
        'table_loss': [common.value_at(loss, s) for s in table_steps],
        'mean_first_update': {
            k: common.mean([r['first_update'][k] for r in per_seed])
            for k in per_seed[0]['first_update']},
        'mean_final_eval_accuracy': common.mean(
            [r['final_eval_accuracy'] for r in per_seed])}
  carried, fresh = arms['carried'], arms['fresh_slots']
  excess = [f - c for f, c in zip(fresh['table_loss'], carried['table_loss'])]
  # The first logged loss is of the restored params, before any update.
  later = excess[1:]
  worst = int(np.argmax(later))
  logs_match = all(
      r['first_update']['next_loss'] == common.value_at(r['loss'], start + 2)
      for a in arms.values() for r in a['per_seed'])
  return {
      'data': {'train_size': summary['train_size'],
               'test_size': summary['test_size']},
      'legacy': {'path': os.path.relpath(config.legacy, common.REPO),
                 'step': start},
      'arm_order': list(config.arm_order), 'arms': arms,
      'table_steps': table_steps,
      'findings': {
          'excess_loss': excess,
          'restored_loss_equal': excess[0] == 0.0,
          'mean_excess_after_first_update': common.mean(later),
          'max_excess': later[worst], 'max_excess_step': table_steps[1 + worst],
          'final_accuracy_gap': (carried['mean_final_eval_accuracy']
                                 - fresh['mean_final_eval_accuracy']),
          'probe_matches_trainer_log': logs_match}}


def plot(summary: dict[str, Any], results_dir: str) -> None:
  """accuracy.png (eval accuracy) and loss.png (train loss after restore)."""
  arms, order = summary['arms'], summary['arm_order']
  start = summary['legacy']['step']
  common.plot_curves(
      os.path.join(results_dir, 'accuracy.png'),
      [(arms[n]['label'], arms[n]['mean_curve'],
        [r['curve'] for r in arms[n]['per_seed']]) for n in order],
      title=f'Legacy Adam checkpoint continued from step {start}',
      ylabel='eval accuracy (1,000 test digits)')
  common.plot_curves(
      os.path.join(results_dir, 'loss.png'),
      [(arms[n]['label'], arms[n]['mean_loss'],
        [r['loss'] for r in arms[n]['per_seed']]) for n in order],
      title='Train loss of each step after the restore',
      ylabel='train loss (the step\'s batch)',
      vlines=[(start, f'restore (step {start})')])


def render(summary: dict[str, Any]) -> str:
  """report.md from summary.json."""
  arms, order = summary['arms'], summary['arm_order']
  carried, fresh = arms['carried'], arms['fresh_slots']
  f = summary['findings']
  start = summary['legacy']['step']
  cfg = carried['config']
  loss_rows = [[s, carried['table_loss'][i], fresh['table_loss'][i],
                f['excess_loss'][i]]
               for i, s in enumerate(summary['table_steps'])]
  update_rows = [[arms[n]['label'], arms[n]['mean_first_update']['l2'],
                  arms[n]['mean_first_update']['mean_abs_over_lr'],
                  arms[n]['mean_first_update']['max_abs_over_lr']]
                 for n in order]
  bump = f['mean_excess_after_first_update']
  lines = [
      '# Migrating a legacy flax.optim checkpoint',
      '',
      f'`{summary["legacy"]["path"]}` is a flax.optim Adam checkpoint of the '
      f'seed CNN at step {start}. It is continued here under optax Adam '
      '(`config.init_from` through the pre_restore hook '
      '`migrate_flax_optim`), with its Adam moments and step carried, '
      'against the same migration followed by `reset_slots` over every param '
      '(fresh moments and counts).',
      '',
      '## Setup',
      '',
      f'- Both arms: digits {common.digits(cfg["classes"])}, steps '
      f'{start} to {cfg["steps"]}, {cfg["optimizer"]}, batch '
      f'{cfg["batch_size"]} (the legacy run\'s), the same batches and seeds; '
      'the train loss is logged at every step.',
      f'- Carried: pre_restore `{[e["name"] for e in cfg["pre_restore"]]}`.',
      f'- Fresh slots: pre_restore '
      f'`{[e["name"] for e in fresh["config"]["pre_restore"]]}`, '
      f'`reset_slots` with patterns `{fresh["config"]["pre_restore"][1]["patterns"]}`.',
      '- The loss logged at step s is that of step s\'s batch under the '
      f'params before its update: at step {summary["table_steps"][0]} both '
      f'arms have the restored params (equal: '
      f'{common.fmt(f["restored_loss_equal"])}).',
      '',
      '## Train loss after the restore (mean over seeds)',
      '',
      common.table(['step', 'carried slots', 'fresh slots',
                    'fresh - carried'], loss_rows),
      '',
      '![train loss after the restore](loss.png)',
      '',
      'The first update after the restore (its size over the learning rate, '
      'per element):',
      '',
      common.table(['arm', 'L2 norm', 'mean abs(update) / lr',
                    'max abs(update) / lr'], update_rows),
      '',
      '![eval accuracy against step](accuracy.png)',
      '',
      common.table(['arm', 'final eval accuracy (mean)'] +
                   [f'seed {s}' for s in summary['seeds']],
                   [[arms[n]['label'], arms[n]['mean_final_eval_accuracy']]
                    + [r['final_eval_accuracy'] for r in arms[n]['per_seed']]
                    for n in order]),
      '',
      '## Findings',
      '',
      f'- Over steps {summary["table_steps"][1]}-{summary["table_steps"][-1]} '
      f'the fresh-slot arm\'s loss is on average '
      f'{common.signed(bump, "above", "below")} the carried arm\'s; the '
      f'largest gap is {common.fmt(f["max_excess"])} at step '
      f'{f["max_excess_step"]}.',
      f'- At the end the carried arm is '
      f'{common.signed(f["final_accuracy_gap"], "above", "below")} the '
      'fresh-slot arm (mean final eval accuracy).',
      '- The first update was redone here from the restored checkpoint; the '
      'loss after it equals the trainer\'s log at the next step: '
      f'{common.fmt(f["probe_matches_trainer_log"])}.',
      '',
      common.environment_section(summary),
  ]
  return '\n'.join(lines)
