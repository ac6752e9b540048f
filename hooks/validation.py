"""Structure checks for flat states, and regex key matching.

A flat state is a ``dict`` from '/'-joined keys to leaves (see ``hooks.flat``).
Everything here works on concrete arrays and on abstract
``jax.ShapeDtypeStruct`` leaves alike, because only shapes and dtypes are
looked at.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from hooks import counts as counts_lib
# Regex matching of keys lives in hooks.keys; re-exported for callers here.
from hooks.keys import match_keys

__all__ = [
    'StructureError',
    'check_structure',
    'expected_structure',
    'leaf_struct',
    'shape_dtype',
    'match_keys',
]

# How many close keys a did-you-mean lists.
_MAX_SUGGESTIONS = 3


def _suggest(key: str, candidates: Iterable[str]) -> list[str]:
  return difflib.get_close_matches(
      key, list(candidates), n=_MAX_SUGGESTIONS, cutoff=0.5
  )


def _did_you_mean(key: str, candidates: Iterable[str]) -> str:
  close = _suggest(key, candidates)
  if not close:
    return ''
  return '  (did you mean ' + ' or '.join(repr(c) for c in close) + '?)'


def _fmt(struct: jax.ShapeDtypeStruct) -> str:
  return f'{tuple(struct.shape)} {np.dtype(struct.dtype).name}'


class StructureError(ValueError):
  """A flat state does not have the keys, shapes or dtypes it should.

  Attributes:
    missing: Keys the expected structure has and the state lacks.
    unexpected: Keys the state has and the expected structure lacks.
    mismatched: Key -> (got, expected) ``ShapeDtypeStruct`` pairs.
  """

  def __init__(
      self,
      missing: Sequence[str] = (),
      unexpected: Sequence[str] = (),
      mismatched: (
          Mapping[str, tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]]
          | None
      ) = None,
      *,
      what: str = 'state',
  ):
    self.missing = sorted(missing)
    self.unexpected = sorted(unexpected)
    self.mismatched = dict(sorted((mismatched or {}).items()))
    super().__init__(self._message(what))

  def _message(self, what: str) -> str:
    counts = (
        f'{len(self.missing)} missing, {len(self.unexpected)} unexpected, '
        f'{len(self.mismatched)} mismatched'
    )
    lines = [f'The {what} does not match the expected structure ({counts}).']
    if self.missing:
      lines.append('Missing keys (expected, not in the state):')
      lines += [
          f'  {k}{_did_you_mean(k, self.unexpected)}' for k in self.missing
      ]
    if self.unexpected:
      lines.append('Unexpected keys (in the state, not expected):')
      lines += [
          f'  {k}{_did_you_mean(k, self.missing)}' for k in self.unexpected
      ]
    if self.mismatched:
      lines.append('Mismatched keys (got vs expected):')
      lines += [
          f'  {k}: got {_fmt(got)}, expected {_fmt(exp)}'
          for k, (got, exp) in self.mismatched.items()
      ]
    lines.append(
        'Fix: add hooks that rename, resize or reinitialize these keys, or '
        'change the model/optimizer so the structures agree.'
    )
    return '\n'.join(lines)


def abstract_leaf(leaf: Any) -> jax.ShapeDtypeStruct:
  """``leaf``'s shape, dtype and sharding (if it has one), nothing else."""
  return jax.ShapeDtypeStruct(*shape_dtype(leaf),
                              sharding=getattr(leaf, 'sharding', None))


def shape_dtype(leaf: Any) -> tuple[tuple[int, ...], Any]:
  """Returns ``(shape, dtype)`` of a leaf as ``leaf_struct`` gives them.

  Cheaper than ``leaf_struct`` (no ``ShapeDtypeStruct`` is built).

  Raises:
    TypeError: If ``leaf`` has no shape or dtype.
  """
  if isinstance(leaf, (jax.ShapeDtypeStruct, jax.Array)):
    return tuple(leaf.shape), leaf.dtype
  try:
    dtype = jax.dtypes.canonicalize_dtype(np.result_type(leaf))
  except TypeError as e:
    raise TypeError(
        f'Leaf {leaf!r} of type {type(leaf).__name__} has no dtype; leaves '
        'must be arrays, ShapeDtypeStructs or numeric scalars.'
    ) from e
  return tuple(np.shape(leaf)), np.dtype(dtype)


def _struct(pair: tuple[tuple[int, ...], Any]) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(*pair)


def leaf_struct(leaf: Any) -> jax.ShapeDtypeStruct:
  """Returns the shape and dtype of one leaf, as JAX would hold it.

  Args:
    leaf: A ``jax.Array``, ``np.ndarray``, ``jax.ShapeDtypeStruct`` or a Python
      or numpy scalar.

  Returns:
    A ``jax.ShapeDtypeStruct``. Dtypes of non-JAX values are canonicalized
    (a Python ``int`` is ``int32`` unless x64 is enabled), so a checkpoint's
    numpy leaves compare equal to the live leaves they restore into.

  Raises:
    TypeError: If ``leaf`` has no shape or dtype.
  """
  return _struct(shape_dtype(leaf))


def expected_structure(
    flat: Mapping[str, Any],
) -> dict[str, jax.ShapeDtypeStruct]:
  """Returns the shape and dtype of every leaf of a flat state.

  Args:
    flat: A flat state (key -> array, scalar or ``ShapeDtypeStruct``).

  Returns:
    Key -> ``jax.ShapeDtypeStruct``, in the order of ``flat``; leaves of the
    same shape and dtype share one.
  """
  # A state of 10^4 leaves has a handful of distinct (shape, dtype) pairs,
  # and building a ShapeDtypeStruct costs microseconds; so does isinstance
  # against jax.Array, asked once per leaf type here. A jax.Array's shape
  # and dtype are its aval's (two property calls saved).
  structs: dict[Any, jax.ShapeDtypeStruct] = {}
  kinds: dict[type, int] = {}  # Type -> 0: shape_dtype, 1: as is, 2: aval.
  out = {}
  for key, leaf in flat.items():
    kind = kinds.get(type(leaf))
    if kind is None:
      kind = kinds[type(leaf)] = (
          2 if issubclass(type(leaf), jax.Array) else
          int(issubclass(type(leaf), jax.ShapeDtypeStruct)))
    if kind == 2:
      aval = leaf.aval
      pair = (aval.shape, aval.dtype)
    else:
      pair = (leaf.shape, leaf.dtype) if kind else shape_dtype(leaf)
    struct = structs.get(pair)
    if struct is None:
      struct = structs[pair] = _struct(pair)
    out[key] = struct
  return out


def check_structure(
    flat: Mapping[str, Any],
    expected: Mapping[str, jax.ShapeDtypeStruct],
    *,
    what: str = 'state',
    partial: bool = False,
) -> None:
  """Checks that a flat state has exactly the expected keys, shapes, dtypes.

  A count of ``hooks.optim`` may have another shape than expected when both
  fit its param (``hooks.counts``): surgery expands counts along the axes
  it edits, and older checkpoints hold per-element counts.

  Args:
    flat: The flat state to check.
    expected: Key -> ``ShapeDtypeStruct`` (e.g. from ``expected_structure``).
    what: What ``flat`` is, for the error message.
    partial: ``flat`` is part of a state: expected keys it lacks are not
      missing.

  Raises:
    StructureError: Listing every missing, unexpected and mismatched key.
  """
  missing = [] if partial else [k for k in expected if k not in flat]
  unexpected = [k for k in flat if k not in expected]
  mismatched = {}
  wanted: dict[int, Any] = {}  # id(expected struct) -> (shape, dtype).
  for k, leaf in flat.items():
    exp = expected.get(k)
    if exp is None:
      continue
    want = wanted.get(id(exp))
    if want is None:
      want = wanted[id(exp)] = shape_dtype(exp)
    if isinstance(leaf, jax.Array):  # The common case, without conversions.
      got = (leaf.shape, leaf.dtype)
    else:
      got = shape_dtype(leaf)
    if got != want:
      mismatched[k] = (_struct(got), _struct(want))
  if mismatched:  # Counts may differ (hooks.counts); look only then.
    shapes = {k[len('params/'):]: v.shape for k, v in expected.items()
              if k.startswith('params/')}
    mismatched = {k: (got, exp) for k, (got, exp) in mismatched.items()
                  if got.dtype != exp.dtype or not k.startswith('opt_state/')
                  or not counts_lib.replaces(k, got.shape, exp.shape, shapes)}
  if missing or unexpected or mismatched:
    raise StructureError(missing, unexpected, mismatched, what=what)
