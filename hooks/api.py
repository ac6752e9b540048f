"""The hook API: what a hook gets (``Context``), records (``Report``), and how
a list of hooks runs over a flat state (``run_hooks``).

A hook is ``factory(**params) -> hook_fn`` with
``hook_fn(flat: dict, ctx: Context) -> dict``. The hook returns a new flat
dict, never mutates its input, and keeps the leaves it does not touch (the
same objects). It must also work when ``ctx.abstract`` is true and the leaves
are ``jax.ShapeDtypeStruct`` (plan / dry-run mode): ``apply_leaf`` helps.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np

from hooks import flat as flat_lib
from hooks import registry
from hooks import validation

__all__ = [
    'ACTIONS',
    'Action',
    'Context',
    'DonorReader',
    'HookError',
    'HookFn',
    'Report',
    'apply_leaf',
    'run_hooks',
]

Flat = dict[str, Any]

# What can happen to a param or an optimizer slot, in table order.
ACTIONS = (
    'copied',
    'renamed',
    'migrated',
    'resized',
    'reinitialized',
    'reset',
    'frozen',
    'modified',  # A custom hook's own edit (e.g. scaled).
    'unchanged',
)
_NEEDS_SOURCE = ('copied', 'renamed', 'migrated')


@runtime_checkable
class DonorReader(Protocol):
  """A checkpoint to copy from, read lazily."""

  @property
  def path(self) -> str:
    """Where the checkpoint is, for messages and the report."""

  @property
  def classes(self) -> tuple[int, ...] | None:
    """The donor run's class labels, when it recorded them."""

  def structure(self) -> dict[str, jax.ShapeDtypeStruct]:
    """Returns key -> shape/dtype of every leaf, from metadata only."""

  def read(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Reads only ``keys``."""


@dataclasses.dataclass(frozen=True)
class Action:
  """One thing a hook did to one key.

  Attributes:
    action: One of ``ACTIONS``.
    source: The key it came from (copied: the donor key; renamed, migrated).
    from_shape: The shape before a resize.
    shape: The shape after a resize.
    hook: The name of the hook that did it (set by ``run_hooks``).
  """

  action: str
  source: str | None = None
  from_shape: tuple[int, ...] | None = None
  shape: tuple[int, ...] | None = None
  hook: str | None = None

  def describe(self) -> str:
    """Returns e.g. ``'resized (256, 5) -> (256, 10)'``."""
    if self.action == 'copied':
      return f'copied from donor key {self.source}'
    if self.action in ('renamed', 'migrated'):
      return f'{self.action} from {self.source}'
    if self.action == 'resized':
      return f'resized {self.from_shape} -> {self.shape}'
    return self.action

  def to_json(self) -> dict[str, Any]:
    out = {'action': self.action, 'description': self.describe()}
    for name in ('source', 'hook'):
      if getattr(self, name) is not None:
        out[name] = getattr(self, name)
    for name in ('from_shape', 'shape'):
      if getattr(self, name) is not None:
        out[name] = list(getattr(self, name))
    return out


_UNCHANGED = Action('unchanged')


def _shape(leaf: Any) -> tuple[int, ...]:
  shape = getattr(leaf, 'shape', None)
  return tuple(shape) if shape is not None else tuple(np.shape(leaf))


class Report:
  """Collects what hooks did, per flat key (params and optimizer slots)."""

  def __init__(self) -> None:
    self._actions: dict[str, list[Action]] = {}
    self._shapes: dict[str, tuple[int, ...]] = {}

  def record(
      self,
      key: str,
      action: str,
      *,
      source: str | None = None,
      from_shape: Sequence[int] | None = None,
      shape: Sequence[int] | None = None,
  ) -> None:
    """Records that ``action`` happened to ``key``.

    Args:
      key: The flat key, in the result state.
      action: One of ``ACTIONS``.
      source: For copied/renamed/migrated, the key the value came from.
      from_shape: For resized, the old shape.
      shape: The key's shape in the result (required for resized).

    Raises:
      ValueError: If the action is unknown or lacks its details.
    """
    if action not in ACTIONS:
      raise ValueError(f'Unknown report action {action!r}; use one of {ACTIONS}.')
    if action in _NEEDS_SOURCE and source is None:
      raise ValueError(f'Report action {action!r} for {key!r} needs source=.')
    if action == 'resized' and (from_shape is None or shape is None):
      raise ValueError(
          f'Report action "resized" for {key!r} needs from_shape= and shape=.'
      )
    self._actions.setdefault(key, []).append(
        Action(
            action,
            source=source,
            from_shape=None if from_shape is None else tuple(from_shape),
            shape=None if shape is None else tuple(shape),
        )
    )
    if shape is not None:
      self._shapes[key] = tuple(shape)

  def merge(self, other: Report, *, hook: str | None = None) -> None:
    """Appends ``other``'s actions, tagged with the hook's name."""
    for key, actions in other._actions.items():  # pylint: disable=protected-access
      if hook:
        actions = [dataclasses.replace(a, hook=hook) for a in actions]
      mine = self._actions.get(key)
      if mine is None:
        self._actions[key] = list(actions)
      else:
        mine.extend(actions)
    self._shapes.update(other._shapes)  # pylint: disable=protected-access

  def finalize(self, flat: Mapping[str, Any]) -> None:
    """Takes shapes from the result and marks untouched params and slots.

    Args:
      flat: The flat state after the last hook.
    """
    for key, leaf in flat.items():
      if key in self._actions or key.startswith('params/'):
        self._shapes[key] = _shape(leaf)
    for param, slots in flat_lib.slot_index(flat).items():
      for key in (param, *slots):
        if key not in self._actions:
          self._actions[key] = [_UNCHANGED]
          self._shapes[key] = _shape(flat[key])

  def actions(self, key: str) -> list[Action]:
    """Returns the actions recorded for ``key`` (empty if none)."""
    return list(self._actions.get(key, ()))

  def keys(self) -> list[str]:
    """Returns the keys with recorded actions, sorted."""
    return sorted(self._actions)

  def totals(self) -> dict[str, int]:
    """Returns action -> number of times recorded, in ``ACTIONS`` order."""
    counts = collections.Counter(
        a.action for actions in self._actions.values() for a in actions
    )
    return {a: counts[a] for a in ACTIONS if counts[a]}

  def table(self) -> str:
    """Returns an aligned table (key, shape, action) with totals at the end."""
    rows = [('key', 'shape', 'action')]
    for key in self.keys():
      shape = str(self._shapes[key]) if key in self._shapes else '-'
      rows.append(
          (key, shape, '; '.join(a.describe() for a in self._actions[key]))
      )
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [
        f'{k:<{widths[0]}}  {s:<{widths[1]}}  {a}'.rstrip() for k, s, a in rows
    ]
    totals = ', '.join(f'{a}: {n}' for a, n in self.totals().items())
    lines.append(f'totals: {totals or "none"}')
    return '\n'.join(lines)

  def to_json(self) -> dict[str, Any]:
    """Returns a JSON-serializable dict, e.g. for ``surgery_report.json``."""
    return {
        'keys': {
            key: {
                'shape': list(self._shapes[key]) if key in self._shapes else None,
                'actions': [a.to_json() for a in self._actions[key]],
            }
            for key in self.keys()
        },
        'totals': self.totals(),
    }


@dataclasses.dataclass(frozen=True)
class Context:
  """What a hook may use besides the flat state.

  Attributes:
    expected: Key -> shape/dtype the final state must have (the target).
    rng: A PRNG key; ``run_hooks`` gives each hook its own (folded in).
    fresh: Returns a freshly initialised flat state of the target model and
      optimizer (abstract in plan mode). ``run_hooks`` calls it at most once.
    classes: The target run's class labels.
    donor: A checkpoint to copy from, or None.
    report: Where hooks record what they did.
    abstract: Whether leaves are ``jax.ShapeDtypeStruct`` (plan mode).
  """

  expected: Mapping[str, jax.ShapeDtypeStruct]
  rng: jax.Array
  fresh: Callable[[], Flat]
  classes: tuple[int, ...] = ()
  donor: DonorReader | None = None
  report: Report = dataclasses.field(default_factory=Report)
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


def _once(fn: Callable[[], Flat]) -> Callable[[], Flat]:
  cache: list[Flat] = []

  def wrapper() -> Flat:
    if not cache:
      cache.append(fn())
    return dict(cache[0])  # A hook may edit its copy.

  return wrapper


def _named(entry: Mapping[str, Any] | HookFn) -> tuple[str, HookFn]:
  if callable(entry) and not isinstance(entry, Mapping):
    return getattr(entry, '__name__', repr(entry)), entry
  return str(dict(entry.items()).get('name')), registry.build(entry)


def run_hooks(
    flat: Mapping[str, Any],
    hook_entries: Sequence[Mapping[str, Any] | HookFn],
    ctx: Context,
    *,
    validate_each: bool = False,
) -> Flat:
  """Runs hooks in order over a flat state and checks the result.

  All entries are built before any hook runs, so a bad entry fails fast.
  Each hook gets a shallow copy of the state, its own rng and report; the
  reports reach ``ctx.report`` only when every hook succeeded. The result
  is checked against ``ctx.expected`` after the last hook (pre-restore: a
  foreign checkpoint may differ until then), or after every hook when
  ``validate_each`` (post-init: the input already has the structure).

  Args:
    flat: The flat state; it is not modified.
    hook_entries: Entries ``{'name': ..., **params}`` or built hook functions.
    ctx: The context; its report receives every hook's actions.
    validate_each: Check the structure after every hook.

  Returns:
    The new flat state.

  Raises:
    HookError: If a hook raises (its ``__cause__`` is the original error).
    StructureError: If a result does not have ``ctx.expected``'s structure.
    ValueError, UnknownHookError: If an entry cannot be built.
  """
  hooks = [_named(entry) for entry in hook_entries]
  fresh = _once(ctx.fresh)
  current = dict(flat)
  validated = None  # The last result checked in full.
  run_report = Report()  # Reaches ctx.report only if every hook succeeds.
  for index, (name, hook_fn) in enumerate(hooks):
    report = Report()
    hook_ctx = dataclasses.replace(
        ctx, rng=jax.random.fold_in(ctx.rng, index), fresh=fresh, report=report
    )
    try:
      result = hook_fn(dict(current), hook_ctx)
    except Exception as e:  # pylint: disable=broad-except
      raise HookError(name, index, e) from e
    if not isinstance(result, dict):
      raise HookError(
          name, index, TypeError(f'returned {type(result).__name__}, not a dict')
      )
    if validate_each:
      what = f'state after hook #{index} {name!r}'
      if validated is not None and result.keys() == validated.keys():
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
    validation.check_structure(
        current, ctx.expected, what='state after the last hook'
    )
  run_report.finalize(current)
  ctx.report.merge(run_report)
  return current
