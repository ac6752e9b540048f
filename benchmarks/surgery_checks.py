"""What the surgery benchmark checks besides time: no copies, no host reads.

`checks` runs one surgery under `jax.transfer_guard_device_to_host
('disallow')` while counting every host conversion of a device array
(`jax.Array._value` and numpy's converters, which a CPU backend does not
guard), and counts the untouched leaves that come out as the very same
objects.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import jax
from jax._src import array as jax_array  # For the host-conversion counter.
import numpy as np

import hooks


@contextlib.contextmanager
def _count_host_conversions() -> Iterator[list[int]]:
  """Counts device arrays turned into host arrays, however it is done.

  On a CPU backend `np.asarray(jax_array)` reads the buffer in place and
  the transfer guard does not see it, so numpy's converters and the
  Array's own (`__array__`, `_value`) are wrapped while the surgery runs.
  """
  count = [0]
  patched = []

  def wrap(owner: Any, name: str, is_property: bool = False) -> None:
    original = getattr(owner, name)
    if is_property:
      def counted_property(self):
        count[0] += 1
        return original.fget(self)
      setattr(owner, name, property(counted_property))
    else:
      def counted(x, *args, **kwargs):
        if isinstance(x, jax.Array):
          count[0] += 1
        return original(x, *args, **kwargs)
      setattr(owner, name, counted)
    patched.append((owner, name, original))

  for name in ('asarray', 'array', 'ascontiguousarray', 'asanyarray'):
    wrap(np, name)
  wrap(jax_array.ArrayImpl, '__array__')
  wrap(jax_array.ArrayImpl, '_value', is_property=True)
  try:
    yield count
  finally:
    for owner, name, original in reversed(patched):
      setattr(owner, name, original)


def _same_objects(before: Any, after: Any, report: Any) -> tuple[int, int]:
  """(untouched leaves, how many of them are the very same objects)."""
  old = hooks.flatten(before)
  touched = {k for k in report.keys()
             if any(a.action in ('copied', 'resized')
                    for a in report.actions(k))}
  untouched = same = 0
  for key, leaf in hooks.flatten(after).items():
    if key in touched:
      continue
    untouched += 1
    same += leaf is old.get(key)
  return untouched, same


def checks(state: Any, run: Callable[[], tuple[Any, Any]]) -> dict[str, Any]:
  """Runs `run()` (a surgery of `state`: `(new_state, report)`) guarded.

  Returns:
    {'untouched', 'untouched_same_objects', 'host_conversions',
    'guard_error' (None, or the guard's error; the surgery then runs
    unguarded), 'report_totals'}.
  """
  with _count_host_conversions() as conversions:
    guard_error = None
    try:
      with jax.transfer_guard_device_to_host('disallow'):
        new_state, report = run()
    except Exception as e:  # pylint: disable=broad-except
      guard_error = f'{type(e).__name__}: {e}'[:300]
      new_state, report = run()
  untouched, same = _same_objects(state, new_state, report)
  return {'untouched': untouched, 'untouched_same_objects': same,
          'host_conversions': conversions[0], 'guard_error': guard_error,
          'report_totals': report.totals()}
