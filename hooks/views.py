"""How the pipeline reads and writes each kind of state, in one place.

A ``View`` flattens a state to the flat view (``split`` also gives the
writer back into that very state, so a pytree is not flattened twice), makes
an abstract copy, writes a flat result back, and adapts ``fresh``:
``of(state)`` gives the one for a pytree (a Linen ``TrainState``) or for an
NNX model / ``(model, optimizer)`` (``hooks.nnx_state``). ``hooks.apply``
and ``hooks.restore`` run one body over either.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax

from hooks import flat as flat_lib
from hooks import nnx_state
from hooks import validation

__all__ = ['View', 'flatten', 'of']

Flat = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class View:
  """The pipeline's access to one kind of state.

  Attributes:
    flatten: ``state -> flat``.
    abstract: ``state -> `` an abstract copy (the state is not touched).
    write: ``(state, flat) -> `` the state holding ``flat`` (a new pytree,
      or the NNX objects updated in place).
    rng_paths: ``state -> `` model paths the flat view leaves out.
    nnx: Whether the state is an NNX one.
    split: ``state -> (flat, write_back)``: ``flatten(state)``, and
      ``write_back(flat)``, which does ``write(state, flat)``.
  """
  flatten: Callable[[Any], Flat]
  abstract: Callable[[Any], Any]
  write: Callable[[Any, Flat], Any]
  rng_paths: Callable[[Any], set[str]]
  nnx: bool
  split: Callable[[Any], tuple[Flat, Callable[[Flat], Any]]]

  def fresh(self, fresh: Callable[[], Any] | None, like: Any
            ) -> Callable[[], Flat] | None:
    """``fresh`` as a flat view; it must give the kind ``like`` is."""
    if fresh is None or not self.nnx:
      return fresh

    def flat() -> Flat:
      state = fresh()
      if isinstance(state, tuple) != isinstance(like, tuple):
        what = {True: '(model, optimizer)', False: 'a model alone'}
        raise ValueError(
            f'fresh() returned {what[isinstance(state, tuple)]}, but the '
            f'state is {what[isinstance(like, tuple)]}: return the same kind.')
      return self.flatten(state)

    return flat


def _nnx_split(state: Any) -> tuple[Flat, Callable[[Flat], Any]]:
  return nnx_state.flatten(state), functools.partial(nnx_state.write, state)


_PYTREE = View(
    flatten=flat_lib.flatten,
    abstract=lambda tree: jax.tree.map(validation.abstract_leaf, tree),
    write=lambda tree, flat: flat_lib.unflatten(flat, tree),
    rng_paths=lambda tree: set(), nnx=False,
    split=flat_lib.flatten_with_rebuild)
_NNX = View(flatten=nnx_state.flatten, abstract=nnx_state.abstract,
            write=nnx_state.write, rng_paths=nnx_state.rng_paths, nnx=True,
            split=_nnx_split)


def of(state: Any) -> View:
  """The view of ``state``: NNX (``nnx_state.is_nnx``) or any pytree."""
  return _NNX if nnx_state.is_nnx(state) else _PYTREE


def flatten(state: Any) -> Flat:
  """The flat view of any state ``apply`` takes."""
  return of(state).flatten(state)
