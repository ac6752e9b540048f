"""Hook ``resize_head``: change a head's classes, columns kept by label."""

from __future__ import annotations

import re
from collections.abc import Sequence

from hooks import api
from hooks import labels as labels_lib
from hooks import map_labels as map_labels_lib
from hooks import registry


@registry.register('resize_head')
def resize_head(
    layer: str,
    from_classes: Sequence[int | str],
    to_classes: Sequence[int | str],
    init: str = 'init',
) -> api.HookFn:
  """Changes a head's classes: ``map_labels`` on the last axis of ``layer``.

  Every variable of ``layer`` has the classes on its last axis (a Dense
  kernel's columns ``(features, k)`` and its bias ``(k,)``). Column ``i``
  of the result belongs to class ``to_classes[i]`` and takes the incoming
  column of that class, in the params and every optimizer slot; new classes
  get ``init`` columns and fresh slots; classes the target lacks go.

  Args:
    layer: The head's layer path, e.g. ``'head'`` or ``'Dense_1'`` (no
      default: a library cannot know which layer is a model's head).
    from_classes: The class of each incoming column.
    to_classes: The class of each target column.
    init: New columns: ``'init'``, ``'zeros'`` or ``'mean'``.

  Returns:
    The hook function.

  Raises:
    ValueError: As ``map_labels``.
  """
  if not isinstance(layer, str) or not layer:
    raise ValueError(f'resize_head: layer {layer!r} must name the head '
                     "layer, e.g. 'head'.")
  spec = labels_lib.spec(re.escape(layer), -1, from_classes, to_classes,
                         hook='resize_head',
                         names=('from_classes', 'to_classes'))
  if spec.source is None or spec.target is None:
    raise ValueError('resize_head: give from_classes and to_classes (the '
                     'class of each incoming and target column).')
  return map_labels_lib.relabel(spec, init, hook='resize_head')
