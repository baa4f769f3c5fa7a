"""Registries restored after a test that registers toys: every registry's entries as before, and the
plugin modules the test imported forgotten (so the next import registers them again)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from advpure.core.registry import restore_all, snapshot_all


@contextmanager
def isolated_registries() -> Iterator[None]:
    saved, modules = snapshot_all(), set(sys.modules)
    try:
        yield
    finally:
        restore_all(saved)
        for name in set(sys.modules) - modules:
            if name.startswith("helpers."):
                del sys.modules[name]
