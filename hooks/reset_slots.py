"""Hook ``reset_slots``: fresh optimizer slots for some params."""

from __future__ import annotations

from collections.abc import Sequence

from hooks import api
from hooks import flat as flat_lib
from hooks import registry


@registry.register('reset_slots')
def reset_slots(patterns: Sequence[str]) -> api.HookFn:
  """Replaces the optimizer slots of matching params with fresh ones.

  The params keep their values. With ``hooks.optim`` optimizers the count is
  a slot too, so the next step is a first Adam step (|update| <= lr); with
  ``optax.adam`` the shared scalar count is not reset.

  Args:
    patterns: Regexes over param paths without ``params/``, e.g.
      ``['Conv_0/.*']``; each must match a param.

  Returns:
    The hook function.
  """

  def hook_fn(flat: dict, ctx: api.Context) -> dict:
    fresh = ctx.fresh()
    fresh_slots = flat_lib.slot_index(fresh)
    out = dict(flat)
    for key in flat_lib.param_keys(flat, patterns):
      for slot in fresh_slots.get(key, ()):
        out[slot] = fresh[slot]
        ctx.report.record(slot, 'reset')
    return out

  return hook_fn
