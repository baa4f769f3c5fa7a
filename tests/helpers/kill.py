"""Kill a run with SIGKILL once its record store holds enough rows (the kill -9 + resume tests)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path


def stored_rows(store: Path, table: str) -> int:
    """Rows of `table` in the SQLite store, read-only (0 while the file or table does not exist)."""
    try:
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=1) as db:
            return db.execute(f"select count(*) from {table}").fetchone()[0]
    except sqlite3.Error:
        return 0


def kill_9_after(
    cmd: list[str], store: Path, table: str, rows: int, *, poll: float = 0.02, timeout: float = 300
):
    """Start `cmd`, SIGKILL it as soon as `store`'s `table` holds `rows` rows (or it ended, or after
    `timeout` s), and wait for it."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while stored_rows(store, table) < rows and proc.poll() is None and time.time() - t0 < timeout:
        time.sleep(poll)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
