#!/usr/bin/env python3
"""A real single-node SLURM cluster on localhost, in a temp dir: to try `experiments/slurm/*.sbatch`
without a cluster, and for the `slurm` tests (which load this file through `tests/helpers`).

    python experiments/slurm/local_cluster.py start [--cpus 2]   # prints `export SLURM_CONF=...`
    python experiments/slurm/local_cluster.py status [DIR]       # its node state and job queue
    python experiments/slurm/local_cluster.py stop [DIR]         # DIR: the printed dir (default: from $SLURM_CONF)

From Python (the standard library only; advpure is not needed):

    with start_cluster(cpus=2) as cluster:          # munged + slurmctld + slurmd, ~1 s
        job = cluster.sbatch("experiments/slurm/benchmark.sbatch", "--gres=", env={...})
        cluster.wait(job, timeout=120)              # scontrol show job until a final state

Needs root (the daemons run as root, `SlurmUser=root`) and the Debian packages `slurm-wlm` and
`munge` (`make apt`). The cluster is self-contained: its own munge key and socket, free TCP ports,
state, spool, pid and log files all under one dir (mode 755: munged refuses a socket inside a 0700
dir, e.g. pytest's `tmp_path`). `stop()` cancels the cluster's jobs, then ends the daemons by the
PIDs in their pid files — nothing else on the machine is touched.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
    "OUT_OF_MEMORY",
}


class SlurmUnavailable(RuntimeError):
    """SLURM or munge is not installed, not runnable here, or the cluster did not come up."""


def _which(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
    return shutil.which(name, path=path)


def missing_requirements() -> str | None:
    """None when a local cluster can be started here, else one line saying what is missing."""
    missing = [n for n in (*DAEMONS, *CLIENTS) if _which(n) is None]
    problems = []
    if missing:
        problems.append(
            f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge, or `make apt` as root)"
        )
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        problems.append("must run as root (the local cluster's daemons run as SlurmUser=root)")
    return "; ".join(problems) or None


def clean_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of the environment without SLURM_* (a non-SLURM run must not think it is in a job)."""
    env = dict(os.environ if base is None else base)
    for k in [k for k in env if k.startswith("SLURM_")]:
        del env[k]
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mib() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return max(int(int(line.split()[1]) / 1024 * 0.8), 256)
    except OSError:
        pass
    return 1024


SLURM_CONF = """\
ClusterName=advpure-local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={base}/run/munge.socket.2
CredType=cred/munge
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool/slurmd-%n
SlurmctldPidFile={base}/run/slurmctld.pid
SlurmdPidFile={base}/run/slurmd.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
ReturnToService=2
MailProg=/bin/true
KillWait={kill_wait}
MinJobAge=3600
InactiveLimit=0
JobRequeue=1
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


@dataclass
class Cluster:
    """A running local cluster. `env` is the environment for client commands (SLURM_CONF set,
    no other SLURM_*): pass it, with your own additions, to subprocesses that call sbatch & co."""

    base: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.base / "slurm.conf"

    @classmethod
    def attach(cls, base: str | Path) -> Cluster:
        base = Path(base)
        env = clean_env()
        env["SLURM_CONF"] = str(base / "slurm.conf")
        env["PATH"] = os.pathsep.join([env.get("PATH", ""), *SBIN])
        return cls(base=base, env=env)

    # --- client commands ---------------------------------------------------------------------
    def run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a client command (`scontrol`, `squeue`, ...) against this cluster; text output."""
        proc = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
            )
        return proc

    def sbatch(
        self,
        script: str | Path,
        *options: str,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> int:
        """Submit `script` (sbatch `options` override its #SBATCH lines; `args` go to the script);
        `env`: variables added to the job's environment. Returns the job id."""
        job_env = {**self.env, **(env or {})}
        proc = subprocess.run(
            ["sbatch", "--parsable", *options, str(script), *args],
            env=job_env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {script} failed: {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, RunTime, Restarts, ExitCode, StdOut, ...);
        empty when the controller no longer knows the job."""
        proc = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if proc.returncode != 0:
            return {}
        out = {}
        for token in proc.stdout.split():
            if "=" in token:
                k, v = token.split("=", 1)
                out.setdefault(k, v)
        return out

    def state(self, job_id: int) -> str:
        return self.job(job_id).get("JobState", "UNKNOWN")

    def wait(self, job_id: int, timeout: float = 300, poll: float = 0.5) -> dict[str, str]:
        """Block until the job reaches a final state; return its `job()` dict. TimeoutError after
        `timeout` seconds (the job is left running: cancel it or stop the cluster)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in FINAL_STATES:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s")
            time.sleep(poll)

    def requeue(self, job_id: int, release: bool = True, timeout: float = 120) -> None:
        """`scontrol requeue` a running job; with `release`, also `release()` it."""
        self.run("scontrol", "requeue", str(job_id))
        if release:
            self.release(job_id, timeout)

    def release(self, job_id: int, timeout: float = 120) -> None:
        """Slurm holds a requeued job back for ~2 minutes (Reason=BeginTime): wait until the job
        is pending again and the node has finished cleaning up its old run (no job COMPLETING:
        starting it earlier lets the old run's end be recorded against the new one), then let it
        start now."""
        deadline = time.monotonic() + timeout
        while self.state(job_id) != "PENDING" or self.completing():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} not pending after {timeout:.0f} s: {self.state(job_id)}; "
                    f"node states {self.node_states()}"
                )
            time.sleep(0.2)
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    def node_states(self) -> list[str]:
        proc = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
        return proc.stdout.split()

    def completing(self) -> bool:
        """A job is still completing somewhere (a node in COMPLETING state, or a job in CG)."""
        jobs = self.run("squeue", "-h", "-t", "CG", "-o", "%i", check=False).stdout.split()
        return bool(jobs) or any("completing" in st for st in self.node_states())

    def log_tail(self, n: int = 40) -> str:
        """The last lines of the daemons' logs (for error messages)."""
        parts = []
        for name in ("munged", "slurmctld", "slurmd"):
            path = self.base / "log" / f"{name}.log"
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-n:]
                parts.append(f"--- {path}\n" + "\n".join(lines))
        return "\n".join(parts)

    # --- stopping ----------------------------------------------------------------------------
    def _pid(self, name: str) -> int | None:
        try:
            return int((self.base / "run" / f"{name}.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self, remove: bool = True, timeout: float = 15) -> None:
        """Cancel this cluster's jobs, end slurmd, slurmctld and munged (by their pid files), and
        delete the dir unless `remove=False`. Safe to call twice."""
        if self._pid("slurmctld") is not None and self.conf.exists():
            try:
                self.run("scancel", "--full", "--user", "root", check=False, timeout=20)
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    q = self.run("squeue", "-h", "-o", "%i", check=False, timeout=20)
                    if q.returncode != 0 or not q.stdout.strip():
                        break
                    time.sleep(0.5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self._pid(name)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and alive(pid):
                time.sleep(0.1)
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if remove:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def alive(pid: int) -> bool:
    """Whether process `pid` is running (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


def start_cluster(
    cpus: int = 2,
    base: str | Path | None = None,
    memory_mib: int | None = None,
    kill_wait: int = 5,
    timeout: float = 30,
) -> Cluster:
    """Start munged, slurmctld and slurmd for a one-node cluster (`cpus` CPUs, partition `debug`)
    in `base` (default: a new dir under /tmp, mode 755). `kill_wait`: seconds between SIGTERM and
    SIGKILL when a job is cancelled or requeued (Lightning ignores SIGTERM under SLURM, so its
    processes run on for that long). Returns once the node is idle; raises `SlurmUnavailable`
    (after cleaning up) if something is missing or a daemon does not come up."""
    problem = missing_requirements()
    if problem:
        raise SlurmUnavailable(f"cannot start a local SLURM cluster: {problem}")
    base = Path(base) if base is not None else Path(tempfile.mkdtemp(prefix="advpure-slurm-", dir="/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o755)
    for sub, mode in (("key", 0o700), ("run", 0o755), ("state", 0o755), ("spool", 0o755), ("log", 0o755)):
        (base / sub).mkdir(exist_ok=True)
        os.chmod(base / sub, mode)
    key = base / "key" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    (base / "slurm.conf").write_text(
        SLURM_CONF.format(
            base=base,
            cpus=int(cpus),
            memory=int(memory_mib or _memory_mib()),
            ctld_port=free_port(),
            slurmd_port=free_port(),
            kill_wait=int(kill_wait),
        )
    )
    cluster = Cluster.attach(base)
    daemon_env = dict(cluster.env)
    try:
        _start(
            daemon_env,
            [
                _which("munged"),
                f"--key-file={key}",
                f"--socket={base}/run/munge.socket.2",
                f"--pid-file={base}/run/munged.pid",
                f"--log-file={base}/log/munged.log",
                f"--seed-file={base}/key/munged.seed",
            ],
        )
        _wait_for(lambda: (base / "run" / "munge.socket.2").exists(), timeout, "munged socket", cluster)
        _start(daemon_env, [_which("slurmctld"), "-f", str(cluster.conf)])
        _start(daemon_env, [_which("slurmd"), "-f", str(cluster.conf), "-N", "localhost"])

        def node_idle() -> bool:
            proc = cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=10)
            return proc.returncode == 0 and proc.stdout.strip().rstrip("*") == "idle"

        _wait_for(node_idle, timeout, "node localhost to be idle", cluster)
    except BaseException:
        cluster.stop(remove=False)
        raise
    return cluster


def _start(env: dict[str, str], cmd: list[str | None]) -> None:
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise SlurmUnavailable(
            f"{' '.join(map(str, cmd))} failed ({proc.returncode}): "
            f"{proc.stderr.strip() or proc.stdout.strip()}"
        )


def _wait_for(ready, timeout: float, what: str, cluster: Cluster) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise SlurmUnavailable(
                f"local SLURM cluster: no {what} after {timeout:.0f} s\n{cluster.log_tail()}"
            )
        time.sleep(0.2)


# --- command line -------------------------------------------------------------------------------
PROG = "python experiments/slurm/local_cluster.py"


def _cluster_dir(arg: str | None) -> Path | None:
    """The cluster dir given, else the dir of $SLURM_CONF; None unless it holds a slurm.conf."""
    base = arg or (str(Path(os.environ["SLURM_CONF"]).parent) if os.environ.get("SLURM_CONF") else None)
    return Path(base) if base is not None and (Path(base) / "slurm.conf").exists() else None


def main(argv: list[str] | None = None) -> int:
    """`start`, `status` or `stop` a local cluster; 0 on success, 1 when SLURM is unavailable or a
    command fails, 2 without a cluster dir."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_start = sub.add_parser("start", help="start a cluster; prints the SLURM_CONF to export")
    p_start.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    p_start.add_argument("--dir", default=None, help="cluster dir (default: a new /tmp/advpure-slurm-*)")
    p_status = sub.add_parser("status", help="its node state (sinfo) and job queue (squeue)")
    p_status.add_argument(
        "dir", nargs="?", default=None, help="cluster dir (default: the dir of $SLURM_CONF)"
    )
    p_stop = sub.add_parser("stop", help="cancel its jobs, stop its daemons and delete its dir")
    p_stop.add_argument("dir", nargs="?", default=None, help="cluster dir (default: the dir of $SLURM_CONF)")
    p_stop.add_argument("--keep", action="store_true", help="keep the dir (logs)")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            cluster = start_cluster(cpus=args.cpus, base=args.dir)
            print(f"local SLURM cluster in {cluster.base} ({args.cpus} CPUs, partition debug)")
            print(f"export SLURM_CONF={cluster.conf}")
            print(f"stop it with: {PROG} stop {cluster.base}")
            return 0
        base = _cluster_dir(args.dir)
        if base is None:
            print(f"{PROG}: give the cluster dir (or set SLURM_CONF to its slurm.conf)", file=sys.stderr)
            return 2
        cluster = Cluster.attach(base)
        if args.command == "status":
            print(
                f"local SLURM cluster in {base}: node localhost {' '.join(cluster.node_states()) or 'down'}"
            )
            print(cluster.run("squeue", "-o", "%.8i %.12j %.10T %.10M %R").stdout.rstrip())
            return 0
        cluster.stop(remove=not args.keep)
        print(f"stopped the local SLURM cluster in {base}")
        return 0
    except (RuntimeError, subprocess.TimeoutExpired) as e:  # SlurmUnavailable is a RuntimeError
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
