"""Writing files without destroying or half-writing them, and filesystem errors as one line.

* `storage_errors(path, what)` — a context manager: an `OSError` (EACCES, EROFS, ENOSPC, EDQUOT,
  ...) or `sqlite3.OperationalError` raised inside it becomes a `StorageError` (exit code 1) that
  names the path and the reason: "cannot write results store runs/x/records/rank0.sqlite:
  read-only file system". `storage_error(e, path, what)` builds that error from a caught one.
* `atomic_write(path, what=...)` — a context manager yielding a file object in `path`'s folder;
  when the block ends without error the file is flushed, fsync'ed and renamed onto `path`, so a
  reader (or a crash) sees the old file or the new one, never half of one. The file is created
  with mode 0666 & ~umask, as `open()` would (`tempfile.mkstemp` would leave 0600, unreadable by
  the other users of a shared cluster). With `overwrite=False` an existing `path` is never replaced
  (a hard link publishes the file, which fails if `path` appeared meanwhile).
  `write_text_atomic` / `write_bytes_atomic` write a whole string / bytes that way.
* `check_output_file(path, what)` — the refusals every writer shares: an empty path, a folder, or
  something that is not a regular file (a device node such as /dev/full, a pipe, a socket: a
  rename would replace the node itself). Raises `StorageError` (or the `error` class given).

What was stored before a failed write stays as it was: the temporary file is removed and the
target is untouched.
"""

from __future__ import annotations

import errno
import os
import secrets
import sqlite3
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from advpure.core.errors import AdvpureError, StorageError

# errno -> the reason in the one-line message
_OS_REASONS = {
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.EISDIR: "it is a folder",
    errno.EIO: "input/output error",
    errno.ENAMETOOLONG: "file name too long",
    errno.ENOENT: "no such file or folder",
    errno.EEXIST: "it exists",
    errno.EFBIG: "file too large",
    errno.EMFILE: "too many open files",
}
# sqlite's primary result codes (`sqlite_errorname`, extended codes start with these) -> reason
_SQLITE_REASONS = {
    "SQLITE_READONLY": "read-only (the file or its folder cannot be written)",
    "SQLITE_FULL": "no space left on device",
    "SQLITE_IOERR": "input/output error",
    "SQLITE_CANTOPEN": "cannot open the file (missing folder or permission denied)",
    "SQLITE_PERM": "permission denied",
    "SQLITE_BUSY": "locked by another process",
    "SQLITE_LOCKED": "locked by another process",
}


def reason(e: BaseException) -> str:
    """The cause of a filesystem error in a few words ("read-only file system", "no space left on
    device", "permission denied", ...): from an OSError's errno or a sqlite3 error's code/text."""
    if isinstance(e, OSError):
        if e.errno in _OS_REASONS:
            return _OS_REASONS[e.errno]
        return (e.strerror or str(e) or type(e).__name__).strip().lower()
    if isinstance(e, sqlite3.Error):
        name = getattr(e, "sqlite_errorname", "") or ""
        for prefix, text in _SQLITE_REASONS.items():
            if name == prefix or name.startswith(prefix + "_"):
                return text
        msg = str(e).lower()
        if "readonly" in msg or "read-only" in msg:
            return _SQLITE_REASONS["SQLITE_READONLY"]
        if "disk is full" in msg:
            return _SQLITE_REASONS["SQLITE_FULL"]
        return msg or type(e).__name__
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def storage_error(e: BaseException, path: str | Path, what: str, verb: str = "write") -> StorageError:
    """A one-line StorageError "cannot <verb> <what> <path>: <reason>" for the caught error `e`."""
    return StorageError(f"cannot {verb} {what} {path}: {reason(e)}")


@contextmanager
def storage_errors(path: str | Path, what: str, verb: str = "write") -> Iterator[None]:
    """Turn an OSError or sqlite3.OperationalError raised inside the block into a one-line
    StorageError naming `what`, `path` and the reason (advpure's own errors pass unchanged).
    `verb` words the message ("write", "create", "read")."""
    try:
        yield
    except AdvpureError:
        raise
    except (OSError, sqlite3.OperationalError) as e:
        raise storage_error(e, path, what, verb) from None


def check_output_file(
    path: str | Path, what: str, *, error: Callable[[str], AdvpureError] = StorageError
) -> Path:
    """Refuse an output path that cannot be a file written by replacing it: empty, a folder, or not
    a regular file (device node, pipe, socket; a symlink is followed to what it names). Returns
    `path` as a Path. Raises `error` (default StorageError) with one line."""
    if isinstance(path, str) and not path.strip():
        raise error(f"the {what} path is empty; give a file path")
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return path
    except OSError as e:
        if e.errno in (errno.ENOTDIR, errno.ELOOP):
            raise error(f"cannot write {what} {path}: {reason(e)}") from None
        return path  # e.g. permission denied on a parent: the write itself will say so
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{what} {path} is a folder; give a file path")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {path} is not a regular file (a device, pipe or socket); give a file path")
    return path


def temp_file_beside(path: str | Path, suffix: str = ".tmp") -> tuple[int, Path]:
    """(fd open for writing, path) of a new hidden file `.<name>.<random><suffix>` in `path`'s
    folder, created with mode 0666 & ~umask as open() would (unlike tempfile.mkstemp's 0600), so
    that renaming it onto `path` gives the usual permissions. Raises OSError."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _publish(tmp: Path, path: Path, overwrite: bool, on_exists: Callable[[Path], AdvpureError] | None):
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic, and fails if path exists (appeared since the check)
    except FileExistsError:
        raise (on_exists(path) if on_exists else StorageError(f"{path} exists; not replaced")) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        # no hard links here (some FUSE / FAT mounts): check, then rename
        if os.path.lexists(path):
            raise (on_exists(path) if on_exists else StorageError(f"{path} exists; not replaced")) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


@contextmanager
def atomic_write(
    path: str | Path,
    *,
    what: str = "file",
    text: bool = False,
    encoding: str = "utf-8",
    newline: str | None = None,
    overwrite: bool = True,
    on_exists: Callable[[Path], AdvpureError] | None = None,
) -> Iterator[IO]:
    """Yield a file (binary, or text with `text`) whose content replaces `path` when the block
    ends without error (see the module doc). The folder is created. `overwrite=False`: an existing
    `path` is not replaced; `on_exists(path)` makes the error (default a StorageError).
    Raises StorageError (one line: empty path, folder, non-regular file, or the OSError's reason);
    on any error the temporary file is removed and `path` is left as it was."""
    path = check_output_file(path, what)
    with storage_errors(path, what):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_file_beside(path)
        try:
            mode = "w" if text else "wb"
            kw = {"encoding": encoding, "newline": newline} if text else {}
            with os.fdopen(fd, mode, **kw) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            _publish(tmp, path, overwrite, on_exists)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        _fsync_dir(path.parent)


def write_text_atomic(path: str | Path, data: str, *, what: str = "file") -> Path:
    """Write `data` (UTF-8) to `path` atomically (`atomic_write`); returns `path` as a Path."""
    with atomic_write(path, what=what, text=True) as f:
        f.write(data)
    return Path(path)


def write_bytes_atomic(path: str | Path, data: bytes, *, what: str = "file") -> Path:
    """Write `data` to `path` atomically (`atomic_write`); returns `path` as a Path."""
    with atomic_write(path, what=what) as f:
        f.write(data)
    return Path(path)


__all__ = [
    "atomic_write",
    "check_output_file",
    "reason",
    "storage_error",
    "storage_errors",
    "temp_file_beside",
    "write_bytes_atomic",
    "write_text_atomic",
]
