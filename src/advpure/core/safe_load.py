"""Read weight and checkpoint files safely, with one-line errors that say what is wrong with the file.

Every file advpure reads with PyTorch goes through here: `load_torch_file` (``torch.load`` with
``weights_only=True``: tensors and plain containers only, never code) for weights files and imported
checkpoints, and `check_torch_file` (a structural check that unpickles nothing) before Lightning
resumes from a checkpoint. A bad file is a `CheckpointError` of one line:

  * missing:                 "<what> not found: <path>" (+ where to get it);
  * an HTML page:            "... is an HTML page, not weights: the download failed" (the first bytes are
                             sniffed before anything is parsed; a failed Google Drive download saves one);
  * truncated / not PyTorch: "... is truncated or not a PyTorch file (<n> bytes)"; a zip-format file
                             whose CRC-32 check fails: "... is corrupt";
  * code in the pickle:      "... contains pickled code; refusing to load it (it needs os.system)" -- the
                             weights-only unpickler refuses it and nothing of the file is executed.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from advpure.core.errors import CheckpointError

__all__ = ["load_torch_file", "check_torch_file", "describe_load_error", "sniff"]

_HTML_MARKERS = (b"<!doctype html", b"<html", b"<head", b"<body", b"<title", b"<meta", b"<script")
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80\x02"  # torch's pre-1.6 format starts with a protocol-2 pickle of its magic number
_GLOBAL_RE = re.compile(r"GLOBAL\s+([A-Za-z_][\w.]*)")


def sniff(path: str | Path, n: int = 1024) -> str:
    """What the first `n` bytes of a file look like: "empty", "html", "zip" (torch >= 1.6 format),
    "legacy" (older torch format) or "other"."""
    with open(path, "rb") as f:
        head = f.read(n)
    if not head:
        return "empty"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<") and (text.startswith(b"<!doctype") or any(m in text for m in _HTML_MARKERS)):
        return "html"
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head.startswith(_LEGACY_MAGIC):
        return "legacy"
    return "other"


def _size(path: Path) -> str:
    try:
        return f"{path.stat().st_size:,} bytes"
    except OSError:
        return "unreadable"


def _not_found(path: Path, what: str, hint: str | None) -> CheckpointError:
    return CheckpointError(f"{what} not found: {path}" + (f" ({hint})" if hint else ""))


def _html(path: Path, what: str, hint: str | None) -> CheckpointError:
    again = f"; get it again: {hint}" if hint else "; delete it and download it again"
    return CheckpointError(f"{what} {path} is an HTML page, not weights: the download failed{again}")


def _truncated(path: Path, what: str, advice: str | None = None) -> CheckpointError:
    tail = f"; {advice}" if advice else ""
    return CheckpointError(f"{what} {path} is truncated or not a PyTorch file ({_size(path)}){tail}")


def _unsafe_globals(path: Path, message: str) -> list[str]:
    """The globals (code) a weights-only load refused: found statically in a zip checkpoint's pickle,
    else read off PyTorch's message. Nothing is unpickled."""
    names: list[str] = []
    try:
        names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - legacy format or unreadable: fall back to the message
        names = []
    if not names:
        names = sorted(set(_GLOBAL_RE.findall(message)))
    return names


def describe_load_error(path: str | Path, exc: BaseException, what: str = "weights file") -> str:
    """One line saying why ``torch.load(path, weights_only=True)`` raised `exc` (PyTorch's own text
    spans many lines): pickled code, or a truncated / non-PyTorch file."""
    path = Path(path)
    message = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "Unsupported operand" not in message:
        names = _unsafe_globals(path, message)
        if names:
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            return (
                f"{what} {path} contains pickled code; refusing to load it (it needs {shown}; "
                f"only tensors and plain containers are loaded)"
            )
    return str(_truncated(path, what))


def _kind(path: Path, what: str, hint: str | None) -> str:
    """`sniff(path)` of an existing file that is not an HTML page; CheckpointError otherwise."""
    if not path.is_file():
        raise _not_found(path, what, hint)
    try:
        kind = sniff(path)
    except OSError as e:
        raise CheckpointError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if kind == "html":
        raise _html(path, what, hint)
    return kind


def load_torch_file(
    path: str | Path,
    *,
    what: str = "weights file",
    hint: str | None = None,
    missing_message: str | None = None,
) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with one-line errors.

    `what` names the file in messages ("weights file", "NCSNv2 checkpoint"); `hint` says where to get
    it (added to the missing / HTML messages); `missing_message` replaces the whole missing-file text.
    Raises CheckpointError: missing file, HTML page, truncated or non-PyTorch file, pickled code.
    """
    path = Path(path)
    if not path.is_file() and missing_message:
        raise CheckpointError(missing_message)
    kind = _kind(path, what, hint)
    if kind == "empty":
        raise _truncated(path, what)
    if kind == "zip":
        _check_zip(path, what, None)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises OSError, RuntimeError, EOFError, UnpicklingError, ...
        raise CheckpointError(describe_load_error(path, e, what)) from None


def check_torch_file(path: str | Path, *, what: str = "checkpoint", advice: str | None = None) -> None:
    """Check, without unpickling anything, that `path` is a complete PyTorch file: it exists, is not an
    HTML page, and, in the zip format every torch >= 1.6 writes, has an intact archive (the CRC of every
    member is verified) holding a ``data.pkl``. For files about to be loaded by a library that calls
    ``torch.load`` itself (Lightning's resume). `advice` ends the truncated-file message.
    Raises CheckpointError."""
    path = Path(path)
    kind = _kind(path, what, None)
    if kind == "legacy":
        return
    if kind != "zip":
        raise _truncated(path, what, advice)
    _check_zip(path, what, advice)


def _check_zip(path: Path, what: str, advice: str | None) -> None:
    """The archive opens, holds a data.pkl, and every member matches its CRC-32 (torch.load itself does
    not check them: a flipped bit in a tensor would load silently)."""
    try:
        with zipfile.ZipFile(path) as zf:
            has_pickle = any(n == "data.pkl" or n.endswith("/data.pkl") for n in zf.namelist())
            bad = zf.testzip() if has_pickle else None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError):
        raise _truncated(path, what, advice) from None
    if not has_pickle:
        raise _truncated(path, what, advice)
    if bad is not None:
        tail = f"; {advice}" if advice else "; download or export it again"
        raise CheckpointError(f"{what} {path} is corrupt: {bad} fails its CRC check{tail}")
