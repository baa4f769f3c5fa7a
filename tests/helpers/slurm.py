"""The local SLURM cluster of `experiments/slurm/local_cluster.py` (a script for users, not part
of the package), loaded by path so that the tests drive the same code a user runs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "slurm" / "local_cluster.py"


def _load():
    name = "advpure_local_cluster"  # registered before it runs: dataclasses look their module up
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


local_cluster = _load()
Cluster = local_cluster.Cluster
SlurmUnavailable = local_cluster.SlurmUnavailable
alive = local_cluster.alive
clean_env = local_cluster.clean_env
free_port = local_cluster.free_port
missing_requirements = local_cluster.missing_requirements
start_cluster = local_cluster.start_cluster

__all__ = [
    "SCRIPT",
    "Cluster",
    "SlurmUnavailable",
    "alive",
    "clean_env",
    "free_port",
    "local_cluster",
    "missing_requirements",
    "start_cluster",
]
