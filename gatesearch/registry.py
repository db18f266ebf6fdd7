"""A named registry filled by a decorator.

Names are given explicitly so that renaming a function or class never renames a
public model or gate. A failed lookup names the registry and lists what exists.
"""

from __future__ import annotations

import fnmatch
import importlib
import pkgutil
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised when a name is not in a registry; the message lists what exists."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps a public name to an object (a class or a builder function).

    The registry's docstring argument states the contract of what it holds.
    """

    def __init__(self, kind: str, doc: str = "") -> None:
        self.kind = kind
        self.__doc__ = doc
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@BACKBONES.register("tiny")``."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def unregister(self, name: str) -> T:
        """Remove ``name`` (a test that registered something takes it back out); returns what it held."""
        self.get(name)  # the usual one-line error for an unknown name
        return self._items.pop(name)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def list(self, pattern: str = "*") -> list[str]:
        """Registered names matching a shell-style pattern, sorted."""
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern))

    def describe(self, name: str) -> str:
        """The first line of the entry's docstring (what ``gatesearch list`` shows)."""
        doc = (self.get(name).__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)


def import_submodules(package: str, path: Iterable[str]) -> None:
    """Import every public module of a package, so that its registering decorators run.

    Called from a package's ``__init__`` with its ``__path__``: a new family is a new file, and no list of
    imports has to be kept in step with the folder.
    """
    for info in pkgutil.iter_modules(path):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
