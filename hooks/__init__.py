"""Model surgery through hooks, for any Flax ``TrainState`` loop.

A flat state maps '/'-joined keys (``params/Conv_0/kernel``,
``opt_state/0/mu/Conv_0/kernel``, ``step``) to leaves; hooks are small pure
functions over it, built from entries like ``{'name': 'reinit', ...}``.
Built in: after init (post_init) ``warm_start`` (from a donor checkpoint, read
lazily through ``open_donor``), ``resize_head``, ``reinit``, ``reset_slots``;
on a checkpoint being restored (pre_restore) ``migrate_flax_optim`` (legacy
``flax.optim``), ``rename``, ``resize_head``. In a plain loop::

  flat = hooks.flatten(state)
  fresh = lambda: hooks.flatten(create_state(rng))  # a fresh target state
  ctx = hooks.Context(hooks.expected_structure(flat), rng, fresh)
  flat = hooks.run_hooks(flat, [{'name': 'reinit', 'patterns': ['Dense_1/.*']}], ctx)
  state = hooks.unflatten(flat, state); print(ctx.report.table())
"""

from hooks import optim
from hooks.api import ACTIONS
from hooks.api import Action
from hooks.api import apply_leaf
from hooks.api import Context
from hooks.api import DonorReader
from hooks.api import HookError
from hooks.api import HookFn
from hooks.api import Report
from hooks.api import run_hooks
from hooks.donors import DonorError
from hooks.donors import open_donor
from hooks.flat import flatten
from hooks.flat import flatten_raw
from hooks.flat import param_keys
from hooks.flat import slot_index
from hooks.flat import unflatten
from hooks.freeze import carry_opt_state
from hooks.freeze import freeze
from hooks.freeze import FreezeSchedule
from hooks.freeze import FrozenTransformation
from hooks.freeze import stop_frozen_gradients
from hooks.registry import build
from hooks.registry import get
from hooks.registry import names
from hooks.registry import register
from hooks.registry import UnknownHookError
from hooks.validation import check_structure
from hooks.validation import expected_structure
from hooks.validation import match_keys
from hooks.validation import StructureError

# Built-in hooks: importing them registers them.
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
    'StructureError',
    'UnknownHookError',
    'apply_leaf',
    'build',
    'carry_opt_state',
    'check_structure',
    'expected_structure',
    'flatten',
    'flatten_raw',
    'freeze',
    'get',
    'match_keys',
    'names',
    'open_donor',
    'optim',
    'param_keys',
    'register',
    'run_hooks',
    'slot_index',
    'stop_frozen_gradients',
    'unflatten',
]
