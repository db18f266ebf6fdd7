"""User code that registers backbones or gates: ``plugins: [my_models.py, my_package.gates]`` in a search.

A plugin is a ``.py`` file (imported by its path) or a module name (imported as Python imports it: installed, or
on ``PYTHONPATH``). Importing it runs its ``@BACKBONES.register`` / ``@register_policy`` decorators, so the
registries know the user's network before the space is validated. The search imports the same plugins again in
every Ray worker that builds a model (``load_plugins`` is idempotent), and an exported model lists them, so
``gatesearch run`` can say which one it needs.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Iterable
from pathlib import Path


class PluginError(ValueError):
    """A plugin that cannot be found or fails to import (one line naming it)."""


def canonical(spec: str) -> str:
    """A file plugin as an absolute path (trials run in other processes and folders), a module name as given."""
    if not isinstance(spec, str) or not spec.strip():
        raise PluginError(f"plugins: expected a .py file or a module name, got {spec!r}")
    if spec.endswith(".py") or "/" in spec or "\\" in spec:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise PluginError(f"plugin {spec}: no such file")
        return str(path.resolve())
    return spec


def load_plugins(specs: Iterable[str] | None) -> tuple[str, ...]:
    """Import each plugin once per process; returns their canonical names (what a search records)."""
    if specs is None:
        return ()
    if isinstance(specs, str) or not isinstance(specs, Iterable):
        raise PluginError(f"plugins: expected a list of .py files or module names, got {specs!r}")
    out = []
    for spec in specs:
        name = canonical(spec)
        _import(name)
        if name not in out:
            out.append(name)
    return tuple(out)


FILE_MODULES = "gatesearch_plugin_"  # prefix of the module names plugin files are imported under


def from_plugin_file(obj: object) -> bool:
    """Whether a class comes from a plugin file: another process cannot import it by reference, it imports the
    plugin itself (``load_plugins``)."""
    return getattr(obj, "__module__", "").startswith(FILE_MODULES)


def _module_name(path: str) -> str:
    """A module name of its own for a plugin file (two files called ``models.py`` do not collide)."""
    return f"{FILE_MODULES}{Path(path).stem}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"


def _import(name: str) -> None:
    is_file = name.endswith(".py")
    module = _module_name(name) if is_file else name
    if module in sys.modules:
        return
    try:
        if is_file:
            spec = importlib.util.spec_from_file_location(module, name)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[module] = mod
            try:
                spec.loader.exec_module(mod)
            except BaseException:
                del sys.modules[module]
                raise
        else:
            importlib.import_module(module)
    except ModuleNotFoundError as e:
        if not is_file and e.name in (name, name.split(".")[0]):
            raise PluginError(f"plugin {name}: no such module (install it, put it on PYTHONPATH, "
                              "or give the .py file)") from None
        raise PluginError(f"plugin {name} failed to import: {_reason(e)}") from None
    except Exception as e:  # whatever the user's code raises, said in one line
        raise PluginError(f"plugin {name} failed to import: {_reason(e)}") from None


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    where = ""
    tb = e.__traceback__
    while tb is not None:  # the innermost frame, so the line in the user's file is named
        frame = tb
        tb = tb.tb_next
    if e.__traceback__ is not None:
        where = f" ({Path(frame.tb_frame.f_code.co_filename).name}, line {frame.tb_lineno})"
    return f"{type(e).__name__}: {text[0] if text else ''}{where}"


__all__ = ["PluginError", "canonical", "from_plugin_file", "load_plugins"]
