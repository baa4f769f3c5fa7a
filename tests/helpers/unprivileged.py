"""Run Python code as the unprivileged user `nobody` (uid/gid 65534), for tests of what a user who
cannot write a folder sees. The interpreter lives under /root (not readable by other users), so the
child starts as root, runs `warmup` (imports, one real call so that lazy imports are done), then
drops to nobody with setgid/setuid and runs `code`. Needs root; `unavailable()` says why not."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

NOBODY = 65534
SRC = Path(__file__).resolve().parents[2] / "src"


def unavailable() -> str | None:
    """Why the tests cannot switch users here (None when they can)."""
    if os.geteuid() != 0:
        return "needs root to switch to the unprivileged user nobody"
    return None


def run_as_nobody(code: str, warmup: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    """`warmup` as root, then `code` as nobody, in one fresh interpreter; text output captured."""
    script = "\n".join(
        [
            "import os, sys",
            f"sys.path.insert(0, {str(SRC)!r})",
            textwrap.dedent(warmup),
            f"os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})",
            textwrap.dedent(code),
        ]
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env
    )
