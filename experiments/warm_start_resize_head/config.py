"""Warm start a ten-digit model from a donor on digits 0-4.

Arms: (a) warm start with the head resized by class map (the donor's
columns of digits 0-4 kept, columns 5-9 from the fresh init; the trainer adds
the labels), (b) warm start with the head
re-initialized, (c) from scratch. Accuracy at fixed step budgets, overall and
on the old (0-4) and new (5-9) digits.
"""

from __future__ import annotations

import copy

import ml_collections

from configs import default
from experiments import common

OLD = (0, 1, 2, 3, 4)
NEW = (5, 6, 7, 8, 9)
ALL = tuple(range(10))


def donor_config(tiny: bool) -> ml_collections.ConfigDict:
  """The donor: the default run on digits 0-4 (15 steps an epoch)."""
  steps = 4 if tiny else 150
  return common.embedded(default.get_config(), classes=OLD, steps=steps,
                         eval_every=2 if tiny else 50, checkpoint_every=steps)


def warm_start(**overrides) -> ml_collections.ConfigDict:
  """The warm_start hook entry of configs/warm_start.py, donor set per seed."""
  entry = dict(donor='', include=('.*',), exclude=(),
               on_shape_mismatch='error', opt_state='fresh', step='reset')
  entry.update(overrides)
  return common.hook('warm_start', **entry)


def target_config(tiny: bool, budgets: tuple[int, ...]
                  ) -> ml_collections.ConfigDict:
  """Ten digits; a checkpoint at every budget is kept for the predictions."""
  every = budgets[1]
  return common.embedded(default.get_config(), classes=ALL, steps=budgets[-1],
                         eval_every=2 if tiny else 5, checkpoint_every=every,
                         keep=budgets[-1] // every + 1)


def arms(target: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The three arms over one target config."""
  out = ml_collections.ConfigDict()
  out.warm_resized = copy.deepcopy(target)
  out.warm_resized.hooks.post_init = [warm_start()]
  out.warm_reinit = copy.deepcopy(target)
  out.warm_reinit.hooks.post_init = [warm_start(exclude=('Dense_1/.*',),
                                                labels=())]
  out.scratch = copy.deepcopy(target)
  return out


def get_config(tiny: bool = False) -> ml_collections.ConfigDict:
  """Returns the experiment config (`tiny`: one seed, a few steps)."""
  config = ml_collections.ConfigDict()
  config.seeds = (0,) if tiny else (0, 1, 2)
  config.old = OLD
  config.new = NEW
  # Steps at which every arm is evaluated per class (multiples of budgets[1]).
  config.budgets = (0, 2, 4) if tiny else (0, 25, 50, 100, 200)
  config.donor = donor_config(tiny)
  config.arms = arms(target_config(tiny, config.budgets))
  config.arm_order = ('warm_resized', 'warm_reinit', 'scratch')
  config.labels = ml_collections.ConfigDict({
      'warm_resized': '(a) warm start, head resized by class map',
      'warm_reinit': '(b) warm start, head re-initialized',
      'scratch': '(c) from scratch'})
  return config
