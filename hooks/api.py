"""What a hook is and what it gets: ``HookFn``, ``Context``, ``DonorReader``.

A hook is ``factory(**params) -> hook_fn`` with
``hook_fn(flat: dict, ctx: Context) -> dict`` (the optax shape). A factory
only checks its parameters: it does no I/O. The hook returns a new flat dict,
never mutates its input, and keeps the leaves it does not touch (the same
objects). It must also work when ``ctx.abstract`` is true and the leaves are
``jax.ShapeDtypeStruct`` (plan mode): ``apply_leaf`` helps. A hook that
copies from a checkpoint asks ``ctx.source(path)`` for it when it runs; the
run opens each path once. Users never build a ``Context``: ``hooks.apply``
and ``hooks.restore`` do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax

from hooks import report as report_lib
from hooks.readers import DonorReader

__all__ = [
    'Context',
    'DonorReader',
    'HookError',
    'HookFn',
    'apply_leaf',
]

Flat = dict[str, Any]


def _no_fresh() -> Flat:
  raise ValueError(
      'This hook needs a freshly initialised target state, and none was '
      'given: pass fresh=lambda: create_state(rng) (a function returning a '
      'new state of the target model and optimizer) to hooks.apply or '
      'hooks.restore.'
  )


def _no_source(path: str) -> DonorReader:
  raise ValueError(
      f'This hook reads the checkpoint {path!r}, but the context opens no '
      'checkpoints; run it through hooks.apply or hooks.restore.'
  )


@dataclasses.dataclass(frozen=True)
class Context:
  """What a hook may use besides the flat state.

  Attributes:
    expected: Key -> shape/dtype the final state must have (the target).
    rng: A PRNG key; every hook of a run gets its own (folded in).
    fresh: Returns a freshly initialised flat state of the target model and
      optimizer (abstract in plan mode); raises when the caller gave none.
    source: Returns the reader of a checkpoint path; a run opens each path
      once and records its provenance in the report.
    checkpoint: In ``hooks.restore``, the checkpoint being restored; else None.
    report: Where hooks record what they did.
    abstract: Whether leaves are ``jax.ShapeDtypeStruct`` (plan mode).
  """

  expected: Mapping[str, jax.ShapeDtypeStruct]
  rng: jax.Array
  fresh: Callable[[], Flat] = _no_fresh
  source: Callable[[str], DonorReader] = _no_source
  checkpoint: DonorReader | None = None
  report: report_lib.Report = dataclasses.field(
      default_factory=report_lib.Report)
  abstract: bool = False


HookFn = Callable[[Flat, Context], Flat]


class HookError(RuntimeError):
  """A hook raised; the message names the hook and its position.

  Attributes:
    name: The hook's name.
    index: Its position in the hook list.
  """

  def __init__(self, name: str, index: int, error: BaseException):
    self.name = name
    self.index = index
    super().__init__(
        f'Hook #{index} {name!r} failed: {type(error).__name__}: {error}'
    )


def apply_leaf(fn: Callable[..., Any], *leaves: Any) -> Any:
  """Applies ``fn`` to leaves, abstractly if any is a ``ShapeDtypeStruct``.

  Args:
    fn: A JAX-traceable function of the leaves.
    *leaves: Arrays or ``jax.ShapeDtypeStruct``.

  Returns:
    ``fn(*leaves)``, or its ``jax.ShapeDtypeStruct`` in plan mode.
  """
  if any(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
    return jax.eval_shape(fn, *leaves)
  return fn(*leaves)
