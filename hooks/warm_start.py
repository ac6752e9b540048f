"""Hook ``warm_start``: ``copy_params`` (+ ``copy_slots``) (+ ``copy_step``).

One entry for the usual warm start. Its pieces plan together, so every
problem of all of them is listed at once and each donor tensor is read once
(a param and its slots in the same pass); the result is the same, bit for
bit, as listing the pieces in order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hooks import api
from hooks import copy as copy_lib
from hooks import copy_plan
from hooks import registry
from hooks import select

_OPT_STATE = ('fresh', 'donor')
_STEP = ('reset', 'donor')


@registry.register('warm_start')
def warm_start(
    donor: str,
    include: Sequence[str] = ('.*',),
    exclude: Sequence[str] = (),
    rename: Sequence[Sequence[str]] = (),
    labels: Sequence[Mapping[str, Any]] = (),
    on_shape_mismatch: str = 'error',
    on_dtype_mismatch: str = 'error',
    opt_state: str = 'fresh',
    step: str = 'reset',
    item: str | None = None,
    donor_step: int | None = None,
) -> api.HookFn:
  r"""Copies a donor's model variables into the state (post-init).

  With the defaults, every model variable (``params/``, ``batch_stats/``,
  ...) is copied from the donor's same key, and the optimizer state and
  step stay fresh: a model warm-starts from an identical donor with no
  further argument. A head whose classes change is copied by label
  (``labels``); other layers are copied as they are.

  Args:
    donor: A checkpoint path in any form ``hooks.open_donor`` reads.
    include: Regexes over the path inside the collection; see
      ``copy_params``.
    exclude: Regexes of variables not to copy.
    rename: ``(target regex, donor path template[, on_shape_mismatch])``
      rules, e.g. ``('Dense_9/(.*)', r'Dense_1/\1')``.
    labels: Label specs, e.g. ``[{'layers': 'head', 'donor': [0, 1, 2, 3,
      4], 'target': list(range(10))}]`` or ``[{'layers': 'head', 'map':
      {7: 2}}]`` (``hooks.labels``); the slots follow.
    on_shape_mismatch: ``'error'``, ``'skip'`` or ``'overlap'``.
    on_dtype_mismatch: ``'error'`` or ``'cast'``.
    opt_state: ``'fresh'`` (keep the target's slots) or ``'donor'``
      (``copy_slots``: the donor's slots of the copied params, moved like
      them).
    step: ``'reset'`` (keep the target's step) or ``'donor'``
      (``copy_step``: ``step`` and scalar ``.../count`` leaves).
    item: The CheckpointManager item to read, when a step has several.
    donor_step: The donor's step to read; default its latest.

  Returns:
    The hook function.

  Raises:
    ValueError: If a parameter is malformed (no I/O here); when the hook
      runs, listing every mismatch between donor and target.
  """
  donor = select.check_donor('warm_start', donor, item, donor_step)
  opts = select.options('warm_start', include, exclude, rename, labels,
                        on_shape_mismatch, on_dtype_mismatch)
  select.choice('warm_start', 'opt_state', opt_state, _OPT_STATE)
  select.choice('warm_start', 'step', step, _STEP)

  def hook_fn(flat: dict, ctx: api.Context) -> dict:
    reader = select.open_source(ctx, donor, item, donor_step, opts)
    structure = reader.structure()
    plan = copy_plan.plan_variables(flat, structure, opts)
    if opt_state == 'donor':
      plan = plan.merge(
          copy_plan.plan_slots(flat, structure, plan, on_dtype_mismatch))
    if step == 'donor':
      plan = plan.merge(copy_plan.plan_step(flat, structure))
    return copy_lib.execute(plan, flat, ctx, reader, 'warm_start')

  hook_fn.__name__ = 'warm_start'  # Names it in HookError when passed built.
  return hook_fn
