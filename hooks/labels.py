"""Labelled axes: which entries of an axis carry which label.

A head's class axis (kernel columns, bias entries) and an embedding table's
token rows are labelled axes. A spec names the layers (a regex over layer
paths: a key's path inside its collection minus its last part, so
``params/head/kernel`` and ``batch_stats/head/mean`` are layer ``head``),
the axis, and the labels on each side, or a map::

  {'layers': 'head', 'axis': -1, 'donor': [0, 1, 2, 3, 4],
   'target': list(range(10))}
  {'layers': 'Embed_0', 'axis': 0, 'donor': old_vocab, 'target': new_vocab}
  {'layers': 'head', 'map': {'7': 2, '0': 4}}   # target label -> source label

Labels are JSON scalars (ints or strings). Without lists, labels are the
indices. Entries pair by equal label, or as the map says (then only the
mapped ones). Everything here checks without I/O; ``hooks.pairing`` pairs
the entries of one tensor and says which label went where.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ['LabelSpec', 'check_layers', 'layer_of', 'parse', 'spec',
           'spec_for']

Label = int | str
_KEYS = {'layers': 'layers', 'axis': 'axis', 'donor': 'source',
         'from': 'source', 'target': 'target', 'to': 'target',
         'map': 'label_map'}


@dataclasses.dataclass(frozen=True)
class LabelSpec:
  """Labels of one axis of some layers (see the module docstring).

  Attributes:
    layers: Regex over layer paths (``re.fullmatch``).
    axis: The labelled axis (negative counts from the end).
    source: Label of each source entry (donor or incoming); None: indices.
    target: Label of each target entry; None: indices.
    label_map: Target label -> source label pairs; None: pair equal labels.
  """

  layers: str
  axis: int = -1
  source: tuple[Label, ...] | None = None
  target: tuple[Label, ...] | None = None
  label_map: tuple[tuple[Label, Label], ...] | None = None


def _label(hook: str, name: str, value: Any) -> Label:
  if isinstance(value, np.integer):
    value = int(value)
  if isinstance(value, bool) or not isinstance(value, (int, str)):
    raise ValueError(
        f'{hook}: {name} holds {value!r}; labels are ints or strings (JSON '
        'scalars), e.g. digits or tokens.')
  return value


def _labels(hook: str, name: str, value: Any) -> tuple[Label, ...] | None:
  if value is None:
    return None
  if isinstance(value, (str, Mapping)) or not isinstance(value, Iterable):
    raise ValueError(f'{hook}: {name} {value!r} must be a list of labels, '
                     'e.g. [0, 1, 2, 3, 4].')
  labels = tuple(_label(hook, name, v) for v in value)
  counts = collections.Counter(labels)
  repeated = sorted((v for v, n in counts.items() if n > 1), key=str)
  if repeated:
    raise ValueError(f'{hook}: {name} {list(labels)} repeats label(s) '
                     f'{repeated}; each entry has one label.')
  return labels


def _as_in(value: Label, labels: tuple[Label, ...] | None) -> Label:
  """Reads a digit string as an int (JSON keys) when the labels are ints."""
  if isinstance(value, str) and value.lstrip('-').isdigit():
    if labels is None or (value not in labels and int(value) in labels):
      return int(value)
  return value


def spec(layers: str, axis: int = -1, source: Any = None, target: Any = None,
         label_map: Mapping[Any, Any] | None = None, *, hook: str = 'labels',
         names: tuple[str, str] = ('donor labels', 'target labels')
         ) -> LabelSpec:
  """Checks and builds a ``LabelSpec`` (no I/O).

  Args:
    layers: Regex over layer paths, e.g. ``'head'`` or ``'encoder/.*'``.
    axis: The labelled axis.
    source: Labels of the source entries (None: indices).
    target: Labels of the target entries (None: indices).
    label_map: Target label -> source label; digit-string keys and values
      (JSON) are read as ints where the labels are ints.
    hook: The hook's name, for messages.
    names: What the hook calls ``source`` and ``target``, for messages.

  Returns:
    The spec.

  Raises:
    ValueError: Naming the bad value and the fix.
  """
  if not isinstance(layers, str) or not layers:
    raise ValueError(
        f'{hook}: class_map/map without a named layer (layers={layers!r}): '
        "name the labelled layer(s), e.g. {'layers': 'head', ...}.")
  try:
    re.compile(layers)
  except re.error as e:
    raise ValueError(f'{hook}: layers {layers!r} is not a valid regex ({e}).'
                     ) from e
  if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
    raise ValueError(f'{hook}: axis {axis!r} must be an int, e.g. -1 for a '
                     'kernel\'s columns or 0 for an embedding\'s rows.')
  source = _labels(hook, names[0], source)
  target = _labels(hook, names[1], target)
  pairs_ = None
  if label_map is not None:
    if not isinstance(label_map, Mapping):
      raise ValueError(f'{hook}: map {label_map!r} must be a dict '
                       '{target label: source label}.')
    pairs_ = tuple(
        (_as_in(_label(hook, 'map', t), target),
         _as_in(_label(hook, 'map', s), source))
        for t, s in label_map.items())
  return LabelSpec(layers, int(axis), source, target, pairs_)


def parse(specs: Any, *, hook: str) -> tuple[LabelSpec, ...]:
  """Parses label specs as entries give them (dicts, see the module doc).

  Args:
    specs: A list of dicts with ``layers`` and optionally ``axis``,
      ``donor``/``from``, ``target``/``to`` and ``map``.
    hook: The hook's name, for messages.

  Returns:
    The specs, in order (for a layer, the first that matches wins).

  Raises:
    ValueError: If a spec is malformed, e.g. has no ``layers``.
  """
  if isinstance(specs, Mapping) or isinstance(specs, str):
    raise ValueError(f'{hook}: labels must be a list of specs, got {specs!r}; '
                     'wrap one spec in [...].')
  out = []
  for item in specs:
    if not isinstance(item, Mapping):
      raise ValueError(f'{hook}: label spec {item!r} must be a dict, e.g. '
                       "{'layers': 'head', 'donor': [...], 'target': [...]}.")
    unknown = sorted(set(item) - set(_KEYS))
    if unknown:
      raise ValueError(f'{hook}: label spec {dict(item)} has unknown key(s) '
                       f'{unknown}; it accepts {sorted(_KEYS)}.')
    args: dict[str, Any] = {}
    for key, value in item.items():
      if _KEYS[key] in args:
        raise ValueError(f'{hook}: label spec {dict(item)} gives '
                         f'{_KEYS[key]} twice; use one of its names.')
      args[_KEYS[key]] = value
    args.setdefault('layers', None)
    out.append(spec(**args, hook=hook))
  return tuple(out)


def layer_of(path: str) -> str:
  """Returns a variable's layer path: its path minus the last part."""
  return path.rpartition('/')[0]


def spec_for(specs: Sequence[LabelSpec], path: str) -> LabelSpec | None:
  """Returns the first spec whose layers match ``path``'s layer, or None."""
  layer = layer_of(path)
  return next((s for s in specs if re.fullmatch(s.layers, layer)), None)


def check_layers(specs: Sequence[LabelSpec], paths: Iterable[str], *,
                 hook: str, what: str = 'layers') -> None:
  """Checks that every spec matches the layer of at least one path.

  Raises:
    ValueError: Listing every spec that matches nothing, the layers there
      are and close ones.
  """
  layers = sorted({layer_of(p) for p in paths})
  lines = []
  for s in specs:
    if not any(re.fullmatch(s.layers, layer) for layer in layers):
      close = difflib.get_close_matches(s.layers, layers, n=3, cutoff=0.5)
      hint = (f' (did you mean {" or ".join(map(repr, close))}?)'
              if close else '')
      lines.append(f'  layers={s.layers!r}{hint}')
  if lines:
    raise ValueError(
        f'{hook}: {len(lines)} label spec(s) match none of the {what}:\n'
        + '\n'.join(lines) + f'\n  The {what} are {layers}; layers match a '
        'layer path (the key path inside its collection minus its last part) '
        'with re.fullmatch.')
