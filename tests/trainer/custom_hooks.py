"""A researcher's own hook, named in configs as 'tests.trainer.custom_hooks:scale'."""

import hooks


def scale(patterns, factor):
  """Multiplies matching params by `factor`."""
  def hook_fn(flat, ctx):
    out = dict(flat)
    for key in hooks.param_keys(flat, patterns):
      out[key] = hooks.apply_leaf(lambda x: x * factor, flat[key])
      ctx.report.record(key, 'modified')
    return out
  return hook_fn
