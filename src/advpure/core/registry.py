"""Registries: one per kind of extension (purifier, attack, evaluation protocol).

A new purifier, attack or protocol is one decorated class (or function) in one module, in the
style of score_sde's `register_predictor`:

    from advpure.purify import Purifier, register_purifier

    @register_purifier("blur")
    class BlurPurifier(Purifier):
        ...

Config files then select it by name (`defense.kind: blur`). A user's own module, outside this
package, is selected by its import path: `defense.kind: mypkg.purifiers:BlurPurifier` imports
`mypkg.purifiers` and uses the attribute (decorated or not: the class carries what the
registry needs). Every listing ("allowed: ..."), config validation, table label and `--help`
text reads the registry, so nothing else has to change.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any

from advpure.core.errors import ConfigError


class Registry:
    """Name -> registered object, for one kind of extension.

    `base` (optional) is the class every registered object must subclass; `check` (optional)
    validates anything else (e.g. a protocol object's type). Names are unique.
    """

    all: list[Registry] = []  # every registry made, for `snapshot_all` / `restore_all` (tests)

    def __init__(self, kind: str, base: type | None = None, check: Callable[[Any], None] | None = None):
        self.kind, self.base, self._check = kind, base, check
        self._entries: dict[str, Any] = {}
        Registry.all.append(self)

    def snapshot(self) -> dict[str, Any]:
        """The current entries (a copy), for `restore`."""
        return dict(self._entries)

    def restore(self, entries: dict[str, Any]) -> None:
        """Put back the entries of a `snapshot` (drops what was registered since)."""
        self._entries = dict(entries)

    def register(self, name: str) -> Callable[[Any], Any]:
        """Decorator: register the class/object under `name` (and set its `.name`)."""

        def deco(obj: Any) -> Any:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: Any) -> None:
        if not name or ":" in name:
            raise ValueError(f"{self.kind} name must be a non-empty name without ':', got {name!r}")
        if name in self._entries and self._entries[name] is not obj:
            raise ValueError(f"{self.kind} '{name}' is already registered ({self._entries[name]!r})")
        self._validate(name, obj)
        if isinstance(obj, type):
            obj.name = name
        self._entries[name] = obj

    def _validate(self, name: str, obj: Any) -> None:
        if self.base is not None and not (isinstance(obj, type) and issubclass(obj, self.base)):
            raise ConfigError(f"{self.kind} '{name}': {obj!r} is not a subclass of {self.base.__name__}")
        if self._check is not None:
            self._check(obj)

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def items(self):
        return self._entries.items()

    def get(self, name: str) -> Any:
        """The object registered as `name`, or imported from `module.path:Attribute`.

        Raises ConfigError: "unknown <kind> 'x'; allowed: a, b, c (or module.path:Name)".
        """
        if name in self._entries:
            return self._entries[name]
        if isinstance(name, str) and ":" in name:
            return self._import(name)
        allowed = ", ".join(self._entries)
        raise ConfigError(f"unknown {self.kind} '{name}'; allowed: {allowed} (or module.path:Name)")

    def _import(self, path: str) -> Any:
        module_name, _, attr = path.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ConfigError(f"{self.kind} '{path}': cannot import module '{module_name}' ({e})") from None
        try:
            obj = getattr(module, attr)
        except AttributeError:
            raise ConfigError(f"{self.kind} '{path}': module '{module_name}' has no '{attr}'") from None
        self._validate(path, obj)
        self._entries[path] = obj
        if isinstance(obj, type) and not obj.__dict__.get("name"):  # not inherited from a parent
            obj.name = path
        return obj


def snapshot_all() -> list[tuple[Registry, dict[str, Any]]]:
    """Every registry's entries; `restore_all` puts them back (a test that registers toys leaves
    nothing behind)."""
    return [(r, r.snapshot()) for r in Registry.all]


def restore_all(saved: list[tuple[Registry, dict[str, Any]]]) -> None:
    for registry, entries in saved:
        registry.restore(entries)


def load_plugins(modules: list[str] | tuple[str, ...] | str | None) -> list[str]:
    """Import the user's plugin modules (their decorators register network kinds, purifiers,
    attacks, protocols, certification bases): a list of module names, or one comma-separated string
    (the `ADVPURE_PLUGINS` environment variable). Only name code you trust, as with any import.
    Returns the names imported. Raises ConfigError for a module that cannot be imported."""
    if isinstance(modules, str):
        modules = [m.strip() for m in modules.split(",")]
    names = [m for m in (modules or []) if m]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"plugins: cannot import module '{name}' ({e})") from None
    return names


__all__ = ["Registry", "load_plugins", "restore_all", "snapshot_all"]
