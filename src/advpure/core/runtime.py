"""The process settings of a run, made once by the command (or by one call of a Python-API user):
OpenMP's wait policy, torch's threads, and every file a run writes kept inside its directories.

Left alone, the libraries a run uses write under $HOME and /tmp: W&B's service logs
(`~/.cache/wandb/logs/core-debug-*.log`, `symon-debug-*.log`) and artifact staging
(`~/.local/share/wandb/artifacts`), matplotlib's config dir and font cache (created when
Lightning is imported), torch.compile's inductor cache (`/tmp/torchinductor_<user>`), Triton's
kernel cache (`~/.triton`), the CUDA driver's JIT cache (`~/.nv/ComputeCache`), torch hub
(`~/.cache/torch`), and temporary files. `redirect_writes` points each of them at a folder of
`paths.cache` (default `<paths.runs>/cache`) through the environment variable the library reads,
**unless that variable is already set**: a user's own setting always wins. Config directories
that only hold the user's settings (`~/.config/wandb`, `~/.config/matplotlib`) are redirected
only when they do not exist, so existing settings are still read and nothing is created there.

`configure` does all of it: the CLI calls it before it imports torch, Lightning, matplotlib or W&B;
`advpure.perf` too; users of the Python API call it first (matplotlib fixes its folders at import
time, OpenMP its wait policy when torch loads). Nothing is set on import and nothing inside a
builder. Nothing secret is read or written: only directory names go into the environment.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# variable -> folder under the cache directory; set only when the variable is absent
CACHE_VARS: dict[str, str] = {
    "XDG_CACHE_HOME": "xdg",  # torch hub and kernels, matplotlib's font cache, wandb-core's logs
    "WANDB_CACHE_DIR": "wandb",  # W&B artifact cache and its service logs (core-debug, symon-debug)
    "WANDB_DATA_DIR": "wandb-data",  # W&B artifact staging (default ~/.local/share/wandb)
    "WANDB_ARTIFACT_DIR": "wandb-artifacts",  # downloaded W&B artifacts (default ./artifacts)
    "TORCHINDUCTOR_CACHE_DIR": "torchinductor",  # torch.compile (default /tmp/torchinductor_<user>)
    "TRITON_HOME": "triton",  # Triton >= 3 (default ~/.triton)
    "TRITON_CACHE_DIR": "triton/cache",  # older Triton (default ~/.triton/cache)
    "CUDA_CACHE_PATH": "nv",  # the CUDA driver's JIT cache (default ~/.nv/ComputeCache)
    "TMPDIR": "tmp",  # Python's tempfile and every library that asks it
}
# variable -> (the user's settings folder under XDG_CONFIG_HOME or ~/.config, folder under the cache)
CONFIG_VARS: dict[str, tuple[str, str]] = {
    "WANDB_CONFIG_DIR": ("wandb", "wandb-config"),
    "MPLCONFIGDIR": ("matplotlib", "matplotlib"),
}


def _user_config_home() -> Path | None:
    xdg = os.environ.get("XDG_CONFIG_HOME")
    if xdg:
        return Path(xdg)
    try:
        return Path.home() / ".config"
    except RuntimeError:  # no home directory at all
        return None


def redirect_writes(cache_dir: str | Path) -> dict[str, str]:
    """Point library caches, logs and temp files at `cache_dir` (see the module docstring).

    `cache_dir` is `paths.cache` (a relative path is taken from the current directory and made
    absolute, so DDP children and later `chdir`s agree). Idempotent; variables already in the
    environment are never changed. Returns the variables it set, {name: directory}. Creates only
    the TMPDIR folder (Python's tempfile silently falls back to /tmp when it is missing); the
    libraries create theirs when they first write. Raises StorageError (one line) when that folder
    cannot be created (read-only file system, permission denied, no space left).
    """
    base = Path(cache_dir).expanduser().absolute()
    chosen: dict[str, str] = {}
    for var, sub in CACHE_VARS.items():
        if var not in os.environ:
            chosen[var] = str(base / sub)
    config_home = _user_config_home()
    for var, (user_dir, sub) in CONFIG_VARS.items():
        if var in os.environ:
            continue
        if config_home is not None and (config_home / user_dir).is_dir():
            continue  # the user's settings live there: keep reading them
        chosen[var] = str(base / sub)
    for var, path in chosen.items():
        os.environ[var] = path
    if "TMPDIR" in chosen:  # the libraries create their own folders; a missing TMPDIR is skipped
        from advpure.core.fsio import storage_errors

        with storage_errors(chosen["TMPDIR"], "cache folder (paths.cache)", "create"):
            Path(chosen["TMPDIR"]).mkdir(parents=True, exist_ok=True)
        tempfile.tempdir = None  # tempfile caches its choice: make it read TMPDIR again
    return chosen


WAIT_POLICY_WARNING = (
    "advpure: torch was imported before OMP_WAIT_POLICY was set, so its OpenMP threads spin while they "
    "wait; on a busy CPU this is very slow (measured on 2 shared cores: one score-net forward 1.29 s "
    "instead of 0.13 s). Fix: start Python with OMP_WAIT_POLICY=PASSIVE, or call "
    "advpure.core.runtime.configure() before importing torch."
)


def set_wait_policy() -> bool:
    """OMP_WAIT_POLICY=PASSIVE unless set (OpenMP threads sleep instead of spinning while they wait;
    spinning threads on a small shared CPU made a DSM step 7.6 s instead of 0.36 s). OpenMP reads it
    once, when torch loads it: returns False (and changes nothing) when torch is already imported."""
    import sys

    if "torch" in sys.modules:
        return "OMP_WAIT_POLICY" in os.environ
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return True


def warn_if_spinning() -> None:
    """Warn once (WAIT_POLICY_WARNING) when torch is loaded and OMP_WAIT_POLICY was never set."""
    import sys
    import warnings

    if "torch" in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
        warnings.warn(WAIT_POLICY_WARNING, RuntimeWarning, stacklevel=3)


def configure(cache: str | Path | None = None, threads: int | None = None) -> dict[str, str]:
    """The process settings of a run, made once before any work: OpenMP's passive waiting
    (`set_wait_policy`, effective only before torch is imported), library caches, logs and temp
    files under `cache` (`redirect_writes`), and torch's intra-op threads (`threads`, None: torch's
    default). The CLI calls it for every command; Python-API users call it first:

        >>> from advpure.core import runtime
        >>> runtime.configure(cache="runs/cache", threads=2)      # before importing torch

    Returns the environment variables it set."""
    set_wait_policy()
    chosen = redirect_writes(cache) if cache is not None else {}
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    else:
        warn_if_spinning()
    return chosen


def configure_for(cfg) -> dict[str, str]:
    """`configure` with a resolved config's `paths.cache` (default `<paths.runs>/cache`) and
    `trainer.num_threads`."""
    paths = cfg.paths
    cache = paths.get("cache") if hasattr(paths, "get") else getattr(paths, "cache", None)
    return configure(cache or Path(paths.runs) / "cache", cfg.trainer.get("num_threads"))
