"""Hook registry: names to hook factories, and building hooks from entries.

A hook factory takes the hook's parameters and returns a hook function
``(flat, ctx) -> flat`` (optax style). Register one with
``@hooks.register('name')``; an entry names a registered factory, or any
factory by import path, ``'package.module:function'``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    'UnknownHookError',
    'build',
    'get',
    'names',
    'register',
]

HookFactory = Callable[..., Callable[..., Any]]

# Filled by @register when the modules defining hooks are imported.
_REGISTRY: dict[str, HookFactory] = {}


class UnknownHookError(KeyError):
  """No hook factory has the requested name."""

  def __str__(self) -> str:  # KeyError would repr() the message.
    return str(self.args[0])


def register(name: str) -> Callable[[HookFactory], HookFactory]:
  """Returns a decorator that registers a hook factory under ``name``.

  Args:
    name: The name entries use; must not contain ':'.

  Returns:
    A decorator that registers the factory and returns it unchanged.

  Raises:
    ValueError: If ``name`` is malformed or already taken by a factory of
      another qualified name.
  """
  if not isinstance(name, str) or not name or ':' in name:
    raise ValueError(
        f'Hook name {name!r} must be a non-empty string without ":" (":" '
        'marks import paths like "package.module:function").'
    )

  def decorator(factory: HookFactory) -> HookFactory:
    # The same function defined again (a re-run module or notebook cell)
    # replaces itself; another function may not take the name.
    if (name in _REGISTRY and
        _qualname(_REGISTRY[name]) != _qualname(factory)):
      raise ValueError(
          f'Hook name {name!r} is already registered to '
          f'{_qualname(_REGISTRY[name])}; pick another name for '
          f'{_qualname(factory)}.'
      )
    _REGISTRY[name] = factory
    return factory

  return decorator


def names() -> list[str]:
  """Returns the registered hook names, sorted."""
  return sorted(_REGISTRY)


def _qualname(obj: Any) -> str:
  return f'{getattr(obj, "__module__", "?")}.{getattr(obj, "__qualname__", obj)}'


def _resolve(path: str) -> HookFactory:
  module_name, _, attr = path.partition(':')
  if not module_name or not attr:
    raise ValueError(
        f'Hook import path {path!r} must look like "package.module:function".'
    )
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ImportError(
        f'Cannot import module {module_name!r} for hook {path!r}: {e}. Check '
        'the spelling and that the package is installed or on PYTHONPATH.'
    ) from e
  obj: Any = module
  for part in attr.split('.'):
    if not hasattr(obj, part):
      public = sorted(n for n in dir(obj) if not n.startswith('_'))
      close = difflib.get_close_matches(part, public, n=3)
      hint = f' Did you mean {close}?' if close else ''
      where = module_name if obj is module else _qualname(obj)
      raise AttributeError(
          f'Hook {path!r}: {where!r} has no attribute {part!r}.{hint}'
      )
    obj = getattr(obj, part)
  if not callable(obj):
    raise TypeError(f'Hook {path!r} resolves to {obj!r}, which is not callable.')
  return obj


def get(name: str) -> HookFactory:
  """Returns the hook factory registered as ``name``, or at an import path.

  Args:
    name: A registered name (``'scale_layer'``) or an import path
      (``'my_package.my_hooks:my_factory'``).

  Returns:
    The factory.

  Raises:
    UnknownHookError: If ``name`` is not registered (lists the known names).
    ImportError, AttributeError, TypeError: If an import path does not
      resolve to a callable.
  """
  if isinstance(name, str) and ':' in name:
    return _resolve(name)
  if name not in _REGISTRY:
    close = difflib.get_close_matches(str(name), _REGISTRY, n=3)
    hint = f' Did you mean {close[0]!r}?' if close else ''
    raise UnknownHookError(
        f'Unknown hook {name!r}.{hint} Registered hooks: {names()}; or give '
        'an import path "package.module:function".'
    )
  return _REGISTRY[name]


def _accepted(signature: inspect.Signature) -> list[str]:
  return [
      p.name
      for p in signature.parameters.values()
      if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
  ]


def build(entry: Mapping[str, Any]) -> Callable[..., Any]:
  """Builds a hook function from an entry: ``{'name': ..., **params}``.

  Args:
    entry: A mapping (a dict or a ``ConfigDict``) with ``name`` and the
      factory's parameters.

  Returns:
    ``factory(**params)``, the hook function, named as the entry.

  Raises:
    ValueError: If ``name`` is missing, a parameter is unknown or a required
      one is missing (the message lists the accepted parameters).
    UnknownHookError: If the name is not registered.
  """
  params = dict(entry.items())
  if 'name' not in params:
    raise ValueError(
        f'Hook entry {params!r} has no "name"; write e.g. '
        "{'name': 'scale_layer', ...}."
    )
  name = params.pop('name')
  factory = get(name)
  signature = inspect.signature(factory)
  accepted = _accepted(signature)
  takes_any = any(
      p.kind == p.VAR_KEYWORD for p in signature.parameters.values()
  )
  unknown = sorted(set(params) - set(accepted))
  if unknown and not takes_any:
    raise ValueError(
        f'Hook {name!r} got unknown parameter(s) {unknown}; it accepts '
        f'{accepted}.'
    )
  missing = [
      p.name
      for p in signature.parameters.values()
      if p.name in accepted and p.default is p.empty and p.name not in params
  ]
  if missing:
    raise ValueError(
        f'Hook {name!r} is missing required parameter(s) {missing}; it '
        f'accepts {accepted}.'
    )
  hook_fn = factory(**params)
  if inspect.isfunction(hook_fn):
    # Names the built hook in errors and reports ('warm_start', not 'hook_fn').
    hook_fn.__name__ = hook_fn.__qualname__ = str(name)
  return hook_fn
