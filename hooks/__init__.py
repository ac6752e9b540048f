"""Model surgery through hooks, for any Flax ``TrainState`` loop.

A flat state maps '/'-joined keys (``params/Conv_0/kernel``,
``batch_stats/BatchNorm_0/mean``, ``opt_state/0/mu/Conv_0/kernel``,
``step``) to leaves; hooks are small pure functions over it, built from
entries like ``{'name': 'reinit', 'patterns': ['head/.*']}``.
``{'name': 'warm_start', 'donor': path}`` copies from a checkpoint saved any
usual way (``open_donor``); ``hooks.restore(checkpoint, target, entries,
rng=...)`` reads a checkpoint through hooks into ``target``; ``hooks.plan``
is ``apply`` run abstractly (nothing read or allocated). In any loop, on a
``TrainState`` (or subclass) ``state`` made by ``create_state(rng)``::

  state, report = hooks.apply(state, [
      {'name': 'reinit', 'patterns': ['Dense_1/.*']},
  ], rng=rng, fresh=lambda: create_state(rng))
  print(report.table())
  state = hooks.freeze_state(state, ['Conv_0/.*'])   # tx and slots agree
"""

from hooks import nnx_freeze
from hooks import nnx_state
from hooks import optim
from hooks import views
from hooks.api import apply_leaf
from hooks.api import Context
from hooks.api import HookError
from hooks.api import HookFn
from hooks.donors import DonorError
from hooks.donors import DonorReader
from hooks.donors import open_donor
from hooks.flat import flatten
from hooks.flat import flatten_raw
from hooks.flat import param_keys
from hooks.flat import slot_index
from hooks.flat import unflatten
from hooks.freeze import carry_opt_state
from hooks.freeze import freeze
from hooks.freeze import freeze_state
from hooks.freeze import FrozenTransformation
from hooks.freeze import stop_frozen_gradients
from hooks.pipeline import apply
from hooks.pipeline import plan
from hooks.pipeline import restore
from hooks.runner import run_flat
from hooks.sources import Sources
from hooks.registry import build
from hooks.registry import get
from hooks.registry import names
from hooks.registry import register
from hooks.registry import UnknownHookError
from hooks.report import ACTIONS
from hooks.report import Action
from hooks.report import Report
from hooks.schedule import FreezeSchedule
from hooks.validation import check_structure
from hooks.validation import expected_structure
from hooks.validation import match_keys
from hooks.validation import StructureError

# Built-in hooks: importing them registers them.
from hooks import copy as _copy  # pylint: disable=unused-import
from hooks import map_labels as _map_labels  # pylint: disable=unused-import
from hooks import migrate_flax_optim as _migrate_flax_optim  # pylint: disable=unused-import
from hooks import reinit as _reinit  # pylint: disable=unused-import
from hooks import rename as _rename  # pylint: disable=unused-import
from hooks import reset_slots as _reset_slots  # pylint: disable=unused-import
from hooks import resize_head as _resize_head  # pylint: disable=unused-import
from hooks import warm_start as _warm_start  # pylint: disable=unused-import

__all__ = [
    'ACTIONS',
    'Action',
    'Context',
    'DonorError',
    'DonorReader',
    'FreezeSchedule',
    'FrozenTransformation',
    'HookError',
    'HookFn',
    'Report',
    'Sources',
    'StructureError',
    'UnknownHookError',
    'apply',
    'apply_leaf',
    'build',
    'carry_opt_state',
    'check_structure',
    'expected_structure',
    'flatten',
    'flatten_raw',
    'freeze',
    'freeze_state',
    'get',
    'match_keys',
    'names',
    'nnx_freeze',
    'nnx_state',
    'open_donor',
    'optim',
    'param_keys',
    'plan',
    'register',
    'restore',
    'run_flat',
    'slot_index',
    'stop_frozen_gradients',
    'unflatten',
    'views',
]
