"""One writer per run directory: an exclusive `flock` on `<run_dir>/.lock`, held for the run's life.

Two runs started into one run directory would both do all the work and overwrite each other's
report. `lock_run_dir` takes the lock (non-blocking) and writes the holder into the file as JSON
(pid, host, start time, launch id); a second run is refused at once with one line naming the holder
and the lock file. The kernel drops the lock when the holding process ends, however it ends
(`kill -9` included), so a lock left by a dead run never blocks: the file stays, its content is
simply overwritten by the next holder. The file is never replaced or deleted (a new inode would let
two processes each hold "the" lock).

Processes of one launch (DDP):

* only the launch's rank 0 takes the lock (`rank` 0, and neither LOCAL_RANK, NODE_RANK nor
  GROUP_RANK > 0: Lightning's subprocess launcher starts ranks > 0 with LOCAL_RANK set). Its
  forked ranks (ddp_fork) share the lock; nobody ever waits for it, so no rank can deadlock;
* the other ranks do not lock. Started separately (srun, torchrun), they refuse too when the file
  names a live holder of another launch (another SLURM job step or torchrun run id), so that all
  ranks of a refused launch stop at once instead of waiting for rank 0 at the process group;
* with a process group already initialised, rank 0's verdict is broadcast to every rank.

In one process the lock is re-entrant (a second benchmark on the same run dir from the same
Python session reuses it) and held until `release_run_dir` or the end of the process.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from advpure.core.errors import RunDirError
from advpure.core.fsio import storage_errors

LOCK_NAME = ".lock"
RETRY_S = 0.5  # a rank > 0 probing the lock holds it shared for microseconds: retry that long

_HELD: dict[str, RunDirLock] = {}  # realpath of the run dir -> its lock held by this process


def launch_id() -> str | None:
    """What the processes of one launch share and another launch does not: the SLURM job and step
    (`<job>.<step>`, array tasks have their own job id), else torchrun's run id; None otherwise."""
    job, step = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_STEP_ID")
    if job and step:
        return f"slurm:{job}.{step}"
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    return f"torchrun:{run}" if run else None


def is_lock_owner(rank: int) -> bool:
    """True for the process of a launch that takes the lock: global `rank` 0 and no local / node /
    group rank > 0 in the environment (set by Lightning's and torchrun's launchers)."""
    if int(rank) != 0:
        return False
    for var in ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        try:
            if int(os.environ.get(var, "0") or 0) > 0:
                return False
        except ValueError:
            continue
    return True


def read_holder(lock_path: str | Path) -> dict[str, Any]:
    """The holder recorded in a lock file ({} when missing, empty or unreadable)."""
    try:
        data = json.loads(Path(lock_path).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "holder unknown"
    parts = [f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"]
    if holder.get("since"):
        parts.append(f"since {holder['since']}")
    if holder.get("launch"):
        parts.append(str(holder["launch"]))
    return ", ".join(parts)


def _in_use(run_dir: Path, lock_path: Path, holder: dict[str, Any], section: str) -> RunDirError:
    return RunDirError(
        f"{run_dir} is in use by another run ({_describe(holder)}; lock file {lock_path}); wait for it "
        f"to end or use another {section}.run_dir"
    )


class RunDirLock:
    """The exclusive lock of one run directory held by this process (see the module doc)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None
        self.pid: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self, section: str = "benchmark") -> RunDirLock:
        """Take the lock without waiting (retrying for RETRY_S seconds) and record this process in
        the file. Raises RunDirError naming the holder when another process holds it; StorageError
        when the run dir or the lock file cannot be created."""
        if self.fd is not None:
            return self
        with storage_errors(self.path, "run dir lock", "create"):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        deadline = time.monotonic() + RETRY_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    with storage_errors(self.path, "run dir lock"):
                        raise
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise _in_use(self.run_dir, self.path, read_holder(self.path), section) from None
                time.sleep(0.05)
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.now(UTC).astimezone().isoformat(timespec="seconds"),
            "launch": launch_id(),
        }
        try:
            with storage_errors(self.path, "run dir lock"):
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.pid = fd, os.getpid()
        return self

    def release(self) -> None:
        """Drop the lock (only in the process that took it: a forked child closing its copy does not
        release its parent's lock). The file stays."""
        if self.fd is None:
            return
        try:
            if self.pid == os.getpid():
                fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _key(run_dir: Path) -> str:
    return os.path.realpath(run_dir)


def held_lock(run_dir: str | Path) -> RunDirLock | None:
    """This process's lock of `run_dir`, if it holds one."""
    lock = _HELD.get(_key(Path(run_dir)))
    return lock if lock is not None and lock.held else None


def check_other_launch(run_dir: str | Path, section: str = "benchmark") -> None:
    """For a rank > 0 started on its own (srun, torchrun): raise RunDirError when the lock file
    names a live holder of another launch (see the module doc). Never waits, never locks."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK_NAME
    mine, holder = launch_id(), read_holder(path)
    theirs = holder.get("launch")
    if mine is None or theirs is None or theirs == mine:
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        raise _in_use(run_dir, path, holder, section) from None
    finally:
        os.close(fd)  # closing drops the shared probe lock


def lock_run_dir(run_dir: str | Path, *, rank: int = 0, section: str = "benchmark") -> RunDirLock | None:
    """Make this process the run directory's one writer (see the module doc); call it before
    reading or changing anything in `run_dir`. Returns the held lock (None on ranks that do not
    lock). Re-entrant within a process. With an initialised process group every rank must call it
    (rank 0's verdict is broadcast). Raises RunDirError (one line, naming the holder's pid and host
    and the lock file) when another run holds it; StorageError when it cannot be created."""
    import torch.distributed as dist

    run_dir = Path(run_dir)
    grouped = dist.is_available() and dist.is_initialized()
    owner = is_lock_owner(rank)
    error: str | None = None
    lock = None
    if owner:
        lock = held_lock(run_dir)
        if lock is None:
            try:
                lock = RunDirLock(run_dir).acquire(section)
                _HELD[_key(run_dir)] = lock
            except RunDirError as e:
                if not grouped:
                    raise
                error = str(e)
    elif not grouped:
        check_other_launch(run_dir, section)
    if grouped:
        verdict = [error]
        dist.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None:
            raise RunDirError(verdict[0])
    return lock


def release_run_dir(run_dir: str | Path) -> None:
    """Release this process's lock of `run_dir` (a no-op when it holds none)."""
    lock = _HELD.pop(_key(Path(run_dir)), None)
    if lock is not None:
        lock.release()


__all__ = [
    "LOCK_NAME",
    "RunDirLock",
    "check_other_launch",
    "held_lock",
    "is_lock_owner",
    "launch_id",
    "lock_run_dir",
    "read_holder",
    "release_run_dir",
]
