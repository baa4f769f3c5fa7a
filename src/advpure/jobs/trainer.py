"""One place that turns `TrainerConfig` into a `lightning.Trainer` for every stage."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from advpure.core.errors import ConfigError, Interrupted


def launch_rank() -> int:
    """This process's global rank, known before the process group exists (srun / torchrun env)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def say(msg: str) -> None:
    """Print `[advpure] msg` on the launch's rank 0 only."""
    if launch_rank() == 0:
        print(f"[advpure] {msg}", flush=True)


def under_slurm() -> bool:
    return "SLURM_JOB_ID" in os.environ and "SLURM_NTASKS" in os.environ


def resolve_accelerator(accelerator: str) -> str:
    if accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return "gpu" if accelerator == "cuda" else accelerator


def available_devices(accelerator: str) -> int:
    if accelerator == "gpu":
        return torch.cuda.device_count()
    if accelerator == "mps":
        return int(torch.backends.mps.is_available())
    return os.cpu_count() or 1


def check_devices(tc: DictConfig) -> tuple[str, int | str]:
    """`devices` larger than what this machine has is a config error, not a hang later."""
    accel = resolve_accelerator(tc.accelerator)
    have = available_devices(accel)
    devices = tc.devices
    if accel != "cpu" and have == 0:
        raise ConfigError(
            f"trainer.accelerator={tc.accelerator}: no {accel} device on this machine; use trainer=cpu"
        )
    # under SLURM each task may see only its own GPU (--gpus-per-task): the scheduler decides
    if devices != "auto" and int(devices) > have and not under_slurm():
        raise ConfigError(f"trainer.devices={devices} but this machine has {have} {accel} device(s)")
    return accel, devices


def build_trainer(tc: DictConfig, **kwargs):
    """A Trainer from the `trainer` block `tc` with the project's fixed choices: our own data
    sharding (no distributed sampler: it pads with duplicates), SLURM auto-requeue when launched by
    srun. `kwargs` go to Lightning. (Thread counts are a process setting: `advpure.core.runtime`.)"""
    import lightning as L

    accel, devices = check_devices(tc)
    plugins = []
    if under_slurm():
        from lightning.pytorch.plugins.environments import SLURMEnvironment

        plugins.append(SLURMEnvironment(auto_requeue=True))
    options = dict(
        accelerator=accel,
        devices=devices,
        num_nodes=tc.num_nodes,
        strategy=tc.strategy,
        precision=tc.precision,
        log_every_n_steps=tc.log_every_n_steps,
        deterministic=tc.deterministic,
        enable_progress_bar=tc.enable_progress_bar,
        use_distributed_sampler=False,
        plugins=plugins or None,
        enable_model_summary=False,
    )
    options.update(kwargs)
    if options.get("enable_progress_bar"):  # a redrawn bar on a terminal, a line every so often in a log
        from advpure.core.progress import progress_bar_callback

        options["callbacks"] = [*(options.get("callbacks") or []), progress_bar_callback()]
    return L.Trainer(**options)


INTERRUPT_CODES = {"KeyboardInterrupt": 130, "SIGTERMException": 143}


@contextlib.contextmanager
def interruptible(trainer, stored: str):
    """Within the block (a `trainer.fit` / `trainer.test`), Ctrl-C or SIGTERM becomes one
    `Interrupted` line, "interrupted: <stored>; rerun the same command to resume", with exit code 130
    or 143 (Lightning turns both into `sys.exit`, code 1 or 0, after calling `on_exception`)."""
    from lightning.pytorch.callbacks import Callback

    class Watch(Callback):
        code: int | None = None

        def on_exception(self, trainer, pl_module, exception):
            Watch.code = INTERRUPT_CODES.get(type(exception).__name__, Watch.code)

    trainer.callbacks.append(Watch())
    message = f"interrupted: {stored}; rerun the same command to resume"
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(message, 130) from None
    except SystemExit:
        if Watch.code is None:
            raise
        raise Interrupted(message, Watch.code) from None


def test_and_read_results(trainer, module, datamodule, run_dir, what: str, t0: float) -> dict | None:
    """`trainer.test(module, datamodule)`, then a barrier, a "<what> finished in N s" line (N from
    `t0`, a `time.perf_counter()` value) and rank 0's `run_dir/results.json` (None where it is not
    written: ranks > 0, or a run that recorded nothing). The run dir's lock is released at the end,
    whatever happens; an interrupt is one `Interrupted` line."""
    import json
    import time
    from pathlib import Path

    from advpure.results.lock import release_run_dir

    try:
        with interruptible(trainer, f"every finished batch is stored in {run_dir}"):
            trainer.test(module, datamodule=datamodule, verbose=False)
    finally:
        release_run_dir(run_dir)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    say(f"{what} finished in {time.perf_counter() - t0:.0f} s")
    results = Path(run_dir) / "results.json"
    return json.loads(results.read_text()) if results.exists() else None
