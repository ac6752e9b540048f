"""Running hooks over a flat state: build every entry, run, check.

``run_flat`` is the core of ``hooks.apply`` and ``hooks.restore``: it
builds the entries (no I/O), runs them in order, each with its own rng and
report, checks the structure, and adds the provenance of every checkpoint
the run opened to the report. Use it to test a hook over a flat dict.

Python's cyclic garbage collector is paused while a surgery runs
(``gc_paused``): a surgery allocates a few objects per leaf and makes no
reference cycles worth collecting, yet every collection of the oldest
generation walks every live object, which made surgery superlinear (1.3x
at 4 * 10^4 leaves and more). Collection resumes as it was afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from absl import logging
import jax

from hooks import api
from hooks import flat as flat_lib
from hooks import registry
from hooks import report as report_lib
from hooks import validation
from hooks.sources import Sources

__all__ = ['Entry', 'build_all', 'gc_paused', 'is_abstract', 'run_flat']

Flat = dict[str, Any]
Entry = Mapping[str, Any] | api.HookFn


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
  """Pauses the cyclic garbage collector; restores its state on exit.

  Also a decorator. Reference counting still frees what a surgery drops;
  cycles made meanwhile are collected once collection resumes. The collector
  is the process's: other threads go without it meanwhile too.
  """
  enabled = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if enabled:
      gc.enable()


def _named(entry: Entry) -> tuple[str, api.HookFn]:
  if callable(entry) and not isinstance(entry, Mapping):
    return getattr(entry, '__name__', repr(entry)), entry
  return str(dict(entry.items()).get('name')), registry.build(entry)


def build_all(entries: Sequence[Entry]) -> list[tuple[str, api.HookFn]]:
  """Builds every entry (no I/O), so a bad one fails before any hook runs.

  Args:
    entries: Entries ``{'name': ..., **params}`` or built hook functions.

  Returns:
    ``(name, hook_fn)`` pairs; built functions pass through.

  Raises:
    ValueError, UnknownHookError: If an entry cannot be built.
  """
  if isinstance(entries, Mapping) or callable(entries):
    raise ValueError(
        f'Hook entries must be a list, got {type(entries).__name__}; wrap a '
        'single entry in [...].'
    )
  return [_named(entry) for entry in entries]


def _once(fn: Callable[[], Flat]) -> Callable[[], Flat]:
  cache: list[Flat] = []

  def wrapper() -> Flat:
    if not cache:
      cache.append(fn())
    return dict(cache[0])  # A hook may edit its copy.

  return wrapper


def _fresh_flat(fresh: Callable[[], Any], abstract: bool
                ) -> Callable[[], Flat]:
  if abstract:
    return _once(lambda: flat_lib.flatten(jax.eval_shape(fresh)))
  return _once(lambda: flat_lib.flatten(fresh()))


def _run(flat: Flat, hooks: list[tuple[str, api.HookFn]], ctx: api.Context,
         validate_each: bool) -> Flat:
  """Runs built hooks in order; reports reach ``ctx.report`` only on success."""
  current = dict(flat)
  # The last state known to match. With validate_each the input has the
  # structure (the caller's promise), so leaves a hook keeps are not checked.
  validated = current if validate_each else None
  run_report = report_lib.Report()
  for index, (name, hook_fn) in enumerate(hooks):
    report = report_lib.Report()
    hook_ctx = dataclasses.replace(
        ctx, rng=jax.random.fold_in(ctx.rng, index), report=report)
    try:
      result = hook_fn(dict(current), hook_ctx)
    except Exception as e:  # pylint: disable=broad-except
      raise api.HookError(name, index, e) from e
    if not isinstance(result, dict):
      raise api.HookError(
          name, index, TypeError(f'returned {type(result).__name__}, not a dict'))
    if validate_each:
      what = f'state after hook #{index} {name!r}'
      if result.keys() == validated.keys():
        # Leaves a hook kept (the same objects) were checked already.
        validation.check_structure(
            {k: v for k, v in result.items() if v is not validated[k]},
            ctx.expected, what=what, partial=True)
      else:
        validation.check_structure(result, ctx.expected, what=what)
      validated = result
    run_report.merge(report, hook=name)
    current = result
  if not validate_each or not hooks:
    validation.check_structure(current, ctx.expected,
                               what='state after the last hook')
  ctx.report.merge(run_report)
  ctx.report.finalize(current)  # Not in run_report: no 10^5 rows to merge.
  return current


def is_abstract(flat: Mapping[str, Any]) -> bool:
  """Whether a flat state holds ``jax.ShapeDtypeStruct`` leaves (plan mode)."""
  # The leaves' types first: a handful, and map(type, ...) runs in C.
  return any(issubclass(t, jax.ShapeDtypeStruct)
             for t in set(map(type, flat.values())))


def _context(expected: Mapping[str, jax.ShapeDtypeStruct], rng: jax.Array,
             fresh: Callable[[], Any] | None, sources: Sources,
             abstract: bool, checkpoint: api.DonorReader | None = None
             ) -> api.Context:
  extra = {} if fresh is None else {'fresh': _fresh_flat(fresh, abstract)}
  return api.Context(expected=expected, rng=rng, source=sources.open,
                     checkpoint=checkpoint, abstract=abstract, **extra)


def _finish(ctx: api.Context, sources: Sources) -> report_lib.Report:
  for reader in sources.readers():
    ctx.report.add_source(reader.provenance())
  return ctx.report


@gc_paused()
def run_flat(
    flat: Mapping[str, Any],
    entries: Sequence[Entry],
    *,
    expected: Mapping[str, jax.ShapeDtypeStruct],
    rng: jax.Array,
    fresh: Callable[[], Any] | None = None,
    sources: Sources | None = None,
    checkpoint: api.DonorReader | None = None,
    validate_each: bool = True,
) -> tuple[Flat, report_lib.Report]:
  """The pipeline on a flat state: hooks, then the structure check.

  ``apply`` and ``restore`` run through it; use it to test a hook over a
  flat dict. Leaves are abstract (plan mode) when any is a
  ``jax.ShapeDtypeStruct``.

  Args:
    flat: The flat state; it is not modified.
    entries: Hook entries or built hooks.
    expected: Key -> shape/dtype the result must have.
    rng: A PRNG key; each hook gets its own fold.
    fresh: Returns a fresh target state (a pytree or a flat dict).
    sources: Where donors are opened, once each.
    checkpoint: The checkpoint being restored, if any (``ctx.checkpoint``).
    validate_each: Check the structure after every hook (the input must
      have it already: only the leaves a hook changes are checked), not
      only after the last.

  Returns:
    ``(new flat state, report)``.

  Raises:
    HookError, StructureError, ValueError: As for ``apply``.
  """
  hooks = build_all(entries)
  sources = sources or Sources()
  ctx = _context(expected, rng, fresh, sources, is_abstract(flat), checkpoint)
  result = _run(dict(flat), hooks, ctx, validate_each)
  logging.debug('Ran %d hooks: %s.', len(hooks), [name for name, _ in hooks])
  return result, _finish(ctx, sources)
