"""Errors a user can act on. The CLI prints them as one line (no traceback) and exits non-zero."""


class AdvpureError(Exception):
    """Base class: a problem with the user's input or environment, stated in one line."""

    exit_code = 1


class ConfigError(AdvpureError, ValueError):
    """Unknown key or group, wrong type, value out of range. Exit code 2 (usage error).
    Also a ValueError: a bad parameter passed through the Python API is a bad value."""

    exit_code = 2


class DataError(AdvpureError):
    """Dataset files missing, corrupt or truncated."""


class CheckpointError(AdvpureError):
    """Weights file missing, unreadable or of another architecture."""


class RunDirError(AdvpureError):
    """A run directory written by another config, or a corrupt results store."""


class Interrupted(AdvpureError):
    """A run stopped by Ctrl-C (SIGINT, exit code 130) or SIGTERM (143): one line saying what was
    stored and how to resume."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


class StorageError(AdvpureError):
    """A file or folder could not be written (read-only file system, no space left, permission
    denied, quota): one line naming the path and the reason. Exit code 1. What was stored before
    the failed write is kept (see `advpure.core.fsio`)."""


class TrainingError(AdvpureError):
    """Training diverged (NaN/Inf loss)."""


class CompileError(AdvpureError):
    """torch.compile is unavailable on this machine, or its net disagrees with the eager one."""


class NonFiniteError(AdvpureError):
    """A network produced NaN or infinite values (diverged or corrupt weights, a bad input)."""


def check_finite(t, what: str) -> None:
    """Raise NonFiniteError naming `what` and how many rows (images) of `t` are not finite."""
    import torch

    bad = ~torch.isfinite(t.detach()).reshape(t.shape[0], -1).all(1) if t.dim() else ~torch.isfinite(t)
    if bool(bad.any()):
        n, total = int(bad.sum()), (t.shape[0] if t.dim() else 1)
        raise NonFiniteError(f"{what} produced NaN or infinite values for {n} of {total} rows")
