"""Hook ``reinit``: reinitialize params (and their optimizer slots)."""

from __future__ import annotations

from collections.abc import Sequence

from hooks import api
from hooks import flat as flat_lib
from hooks import registry


@registry.register('reinit')
def reinit(patterns: Sequence[str]) -> api.HookFn:
  """Replaces matching params, and their slots, with freshly initialised ones.

  Fresh values come from ``ctx.fresh()`` (the target model's initializers and
  ``tx.init``), so a reinitialized head gets the target's shape. With
  ``hooks.optim`` optimizers the fresh slots include count 0: no bias
  correction kick on the next step.

  Args:
    patterns: Regexes over param paths without ``params/``, e.g.
      ``['Dense_1/.*']``; each must match a param.

  Returns:
    The hook function.
  """

  def hook_fn(flat: dict, ctx: api.Context) -> dict:
    fresh = ctx.fresh()
    fresh_slots = flat_lib.slot_index(fresh)
    out = dict(flat)
    for key in flat_lib.param_keys(flat, patterns):
      if key not in fresh:
        raise KeyError(
            f'{key!r} is not in the fresh target state; reinitialize only '
            'params the target model has.'
        )
      out[key] = fresh[key]
      ctx.report.record(key, 'reinitialized')
      for slot in fresh_slots[key]:
        out[slot] = fresh[slot]
        ctx.report.record(slot, 'reset')
    return out

  return hook_fn
