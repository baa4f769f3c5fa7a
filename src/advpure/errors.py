"""Errors a user can act on. The CLI prints them as one line (no traceback) and exits non-zero."""


class AdvpureError(Exception):
    """Base class: a problem with the user's input or environment, stated in one line."""

    exit_code = 1


class ConfigError(AdvpureError):
    """Unknown key or group, wrong type, value out of range. Exit code 2 (usage error)."""

    exit_code = 2


class DataError(AdvpureError):
    """Dataset files missing, corrupt or truncated."""


class CheckpointError(AdvpureError):
    """Weights file missing, unreadable or of another architecture."""


class RunDirError(AdvpureError):
    """A run directory written by another config, or a corrupt results store."""


class TrainingError(AdvpureError):
    """Training diverged (NaN/Inf loss)."""


class CompileError(AdvpureError):
    """torch.compile is unavailable on this machine, or its net disagrees with the eager one."""
