"""The project's own sbatch scripts on a real single-node SLURM cluster (munged + slurmctld + slurmd
on localhost, `experiments/slurm/local_cluster.py`): a 2-task CPU benchmark job gives the same per-sample records
and results as a local 1-process run, and a requeued job resumes without redoing stored batches.

Needs root and the Debian packages slurm-wlm and munge (`make apt`): without them these tests
fail (they do not skip), because `make test` is meant to run them.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from advpure.results import load_records, rank_files, read_json
from conftest import ROOT, needs_fmnist, tiny_overrides
from helpers.slurm import (
    SCRIPT,
    Cluster,
    SlurmUnavailable,
    alive,
    clean_env,
    free_port,
    missing_requirements,
    start_cluster,
)

BENCHMARK_SBATCH = ROOT / "experiments" / "slurm" / "benchmark.sbatch"
TASKS = 2

# Sizes that train in seconds (quality is irrelevant: the tests compare runs with each other).
NETS = ["data.train_subset=2000", "data.val_size=500", "score.ngf=8"]
TRAIN = [
    "trainer.max_epochs=1",
    "score.max_steps=20",
    "score.val_every_n_steps=10",
    "score.ckpt_every_n_steps=10",
    "score.batch_size=32",
]
BENCH = [
    "benchmark.batch_size=2",
    "benchmark.worst_of_n=3",
    "benchmark.image_grid=2",
    "benchmark.train_missing=false",
    "defense.replicas=2",
    "defense.steps=3",
    "attack=[pgd40_blind,bpda40_eot15]",
    "attacks.pgd40_blind.iters=3",
    "attacks.bpda40_eot15.eot=2",
]
SMALL = [*BENCH, "benchmark.n_images=7", "attacks.bpda40_eot15.iters=3"]
# Long enough that a requeue after the first stored batch leaves most of the work undone.
LONG = [*BENCH, "benchmark.n_images=24", "attacks.bpda40_eot15.iters=8"]

ACCURACY_FIELDS = (
    "n",
    *(
        f"{p}{s}"
        for p in ("natural", "single", "worst_of_n", "mean_of_n", "ever_broken")
        for s in ("", "_lo", "_hi", "_n")
    ),
)
JOB_TIMEOUT = 300  # typical jobs take 20-40 s; the 2 cores are shared with other work


# --- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    """A real SLURM cluster on localhost for this module (2 CPUs), stopped at teardown."""
    problem = missing_requirements()
    if problem:
        pytest.fail(f"the `slurm` tests start a local SLURM cluster: {problem}", pytrace=False)
    try:
        # start_cluster makes its dir with tempfile.mkdtemp(dir="/tmp"), mode 755: munged refuses
        # a socket inside a 0700 dir such as pytest's tmp_path.
        c = start_cluster(cpus=TASKS, kill_wait=2)
    except SlurmUnavailable as e:
        pytest.fail(str(e), pytrace=False)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Tiny classifier + score weights, trained once by the CLI (no SLURM) for all jobs here."""
    root = tmp_path_factory.mktemp("slurm")  # jobs run as root: a 0700 dir is fine here
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "advpure",
            "train",
            "experiment=fmnist",
            *overrides(root, root / "train_runs", TRAIN),
        ],
        env=local_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, (
        f"training the tiny nets failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    assert (root / "artifacts" / "fmnist" / "classifier.pt").exists()
    assert (root / "artifacts" / "fmnist" / "score.pt").exists()
    return root


@pytest.fixture(scope="module")
def reference_small(work):
    return LocalRun(work, "ref_small", SMALL)


@pytest.fixture(scope="module")
def reference_long(work):
    return LocalRun(work, "ref_long", LONG)


# --- helpers ------------------------------------------------------------------------------------
def overrides(root: Path, runs: Path, extra: list[str]) -> list[str]:
    return [*tiny_overrides(root, **{"paths.runs": runs}), *NETS, *extra]


def local_env() -> dict[str, str]:
    env = clean_env()  # no SLURM_*: a local run must not think it is a SLURM task
    return env


def run_dir(runs: Path) -> Path:
    return runs / "benchmark" / "fmnist"


class LocalRun:
    """The same benchmark as one local process (no srun), started in the background at once so it
    overlaps with the SLURM job; `.result()` waits for it and returns its run dir."""

    def __init__(self, root: Path, name: str, extra: list[str]):
        self.runs = root / name
        self.log = root / f"{name}.log"
        cmd = [
            sys.executable,
            "-m",
            "advpure",
            "benchmark",
            "experiment=fmnist",
            "trainer.num_threads=1",
            *overrides(root, self.runs, extra),
        ]
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(cmd, env=local_env(), stdout=f, stderr=subprocess.STDOUT)

    def result(self) -> Path:
        rc = self.proc.wait(timeout=JOB_TIMEOUT)
        assert rc == 0, f"local reference run failed ({rc}):\n{self.log.read_text()[-4000:]}"
        return run_dir(self.runs)


def submit(
    cluster: Cluster, root: Path, name: str, extra: list[str], python: str = sys.executable
) -> tuple[int, Path]:
    """Submit experiments/slurm/benchmark.sbatch as a 2-task CPU job; returns (job id, log file).
    The #SBATCH lines meant for GPU nodes are overridden on the command line, as a user would."""
    runs = root / name
    log = root / f"{name}.slurm.log"
    job_env = {
        "EXPERIMENT": "fmnist",
        "ADVPURE_TRAINER": "cpu",  # trainer=cpu, torch threads = --cpus-per-task
        "ADVPURE_ARGS": " ".join(overrides(root, runs, extra)),
        "PYTHON": python,
        # Lightning derives the DDP port from the job id (15000 + id % 1000): a free one instead,
        # so that a cluster started beside this one (same job ids) cannot collide with it.
        "MASTER_PORT": str(free_port()),
    }
    job = cluster.sbatch(
        BENCHMARK_SBATCH,
        "--gres=none",
        f"--ntasks-per-node={TASKS}",
        "--cpus-per-task=1",
        "--time=00:15:00",
        f"--output={log}",
        f"--chdir={root}",
        env=job_env,
    )
    return job, log


def job_log(log: Path) -> str:
    return log.read_text(errors="replace")[-6000:] if log.exists() else f"(no job log {log})"


def wait_completed(cluster: Cluster, job: int, log: Path) -> dict[str, str]:
    info = cluster.wait(job, timeout=JOB_TIMEOUT)
    assert info.get("JobState") == "COMPLETED", (
        f"job {job}: {info.get('JobState')} {info.get('ExitCode')} {info.get('Reason')}\n{job_log(log)}\n"
        f"{cluster.log_tail(60)}"
    )
    return info


def stored_batches(run: Path) -> dict[tuple, tuple]:
    """Every done marker of every rank file, read-only (the job may be writing):
    {(file, defense, attack, batch): (first_idx, n, score_evals, seconds)}."""
    out = {}
    for path in sorted((run / "records").glob("rank*.sqlite")):
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
            try:
                rows = conn.execute(
                    "SELECT defense, attack, batch, first_idx, n, score_evals, seconds FROM batches"
                )
                out.update({(path.name, *r[:3]): tuple(r[3:]) for r in rows.fetchall()})
            finally:
                conn.close()
        except sqlite3.OperationalError:  # the file is being created: no table yet
            continue
    return out


def wait_for_first_batch(cluster: Cluster, job: int, run: Path, log: Path) -> dict[tuple, tuple]:
    deadline = time.monotonic() + JOB_TIMEOUT
    while True:
        done = stored_batches(run)
        if done:
            return done
        state = cluster.state(job)
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), (
            f"job {job} {state} before a batch was stored\n{job_log(log)}"
        )
        assert time.monotonic() < deadline, (
            f"job {job}: no batch stored after {JOB_TIMEOUT} s\n{job_log(log)}"
        )
        time.sleep(0.2)


def wait_pending(cluster: Cluster, job: int, log: Path) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT
    while (state := cluster.state(job)) != "PENDING":
        assert state not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), (
            f"job {job} {state}, not requeued\n{job_log(log)}"
        )
        assert time.monotonic() < deadline, (
            f"job {job} not requeued after {JOB_TIMEOUT} s ({state})\n{job_log(log)}"
        )
        time.sleep(0.2)


def assert_same_results(slurm_run: Path, local_run: Path) -> None:
    """Same per-sample records, and the same accuracies and n in every row of results.json."""

    def rows(run: Path) -> dict[tuple, dict]:
        data, _ = read_json(run / "results.json")
        return {(r["defense"], r["attack"], r["merge"]): {k: r[k] for k in ACCURACY_FIELDS} for r in data}

    got, want = rows(slurm_run), rows(local_run)
    assert len(want) >= 5 and set(got) == set(want)
    for key in want:
        assert got[key] == want[key], f"row {key} differs:\nslurm {got[key]}\nlocal {want[key]}"
    assert load_records(slurm_run) == load_records(local_run)


def assert_resumed(run: Path, before: dict[tuple, tuple], local_run: Path, log: Path) -> None:
    """The batches stored when the job went back to pending were kept as they were (a redone
    batch rewrites its marker, with a new measured time), and the restart did the rest."""
    final = stored_batches(run)
    changed = {k: (v, final.get(k)) for k, v in before.items() if final.get(k) != v}
    assert not changed, f"batches stored before the requeue were recomputed: {changed}\n{job_log(log)}"
    expected = len(stored_batches(local_run))
    assert len(before) < expected, (
        f"the first run finished everything ({len(before)} batches) before the requeue"
    )
    assert len(final) == expected, (
        f"{len(final)} batch markers after the restart, {expected} in the local run"
    )


# --- tests --------------------------------------------------------------------------------------
@pytest.mark.slurm
@needs_fmnist
def test_benchmark_job_with_two_tasks_matches_a_local_run(cluster, work, reference_small):
    job, log = submit(cluster, work, "job_small", SMALL)
    wait_completed(cluster, job, log)
    text = log.read_text()
    assert f"trainer.devices={TASKS} trainer.num_nodes=1 trainer.strategy=ddp" in text
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in text and "GLOBAL_RANK: 1, MEMBER: 2/2" in text
    slurm_run = run_dir(work / "job_small")
    assert [p.name for p in rank_files(slurm_run)] == ["rank0.sqlite", "rank1.sqlite"]
    assert {k[0] for k in stored_batches(slurm_run)} == {"rank0.sqlite", "rank1.sqlite"}  # both ranks worked
    local_run = reference_small.result()
    assert [p.name for p in rank_files(local_run)] == ["rank0.sqlite"]
    assert_same_results(slurm_run, local_run)


@pytest.mark.slurm
@pytest.mark.slow  # `scontrol requeue`; the fast suite covers requeue + resume through SIGUSR1 below
@needs_fmnist
def test_requeued_benchmark_job_resumes_without_redoing_stored_batches(cluster, work, reference_long):
    job, log = submit(cluster, work, "job_requeue", LONG)
    slurm_run = run_dir(work / "job_requeue")
    first = wait_for_first_batch(cluster, job, slurm_run, log)
    cluster.requeue(job, release=False)
    wait_pending(cluster, job, log)  # the first run's processes are gone now
    before = stored_batches(slurm_run)
    assert set(first) <= set(before)
    cluster.release(job)
    info = wait_completed(cluster, job, log)
    assert int(info["Restarts"]) == 1
    text = log.read_text()
    assert f"job {job} restart 0" in text and f"job {job} restart 1" in text
    local_run = reference_long.result()
    assert_resumed(slurm_run, before, local_run, log)
    assert_same_results(slurm_run, local_run)


@pytest.mark.slurm
@needs_fmnist
def test_sigusr1_before_the_time_limit_requeues_through_lightning(cluster, work, reference_long):
    """What `--signal=SIGUSR1@90` does at the time limit: Lightning's SLURMEnvironment handler
    saves an hpc checkpoint and calls `scontrol requeue`; the restart resumes from the records."""
    job, log = submit(cluster, work, "job_usr1", LONG)
    slurm_run = run_dir(work / "job_usr1")
    wait_for_first_batch(cluster, job, slurm_run, log)
    cluster.run("scancel", "--signal=USR1", str(job))  # to the tasks of every step, as --signal does
    wait_pending(cluster, job, log)
    before = stored_batches(slurm_run)
    assert list(slurm_run.glob("hpc_ckpt_*.ckpt")), "Lightning's SIGUSR1 handler saved no hpc checkpoint"
    cluster.release(job)
    info = wait_completed(cluster, job, log)
    assert int(info["Restarts"]) == 1
    text = log.read_text()
    assert f"Requeued SLURM job: {job}" in text  # logged by Lightning's SIGUSR1 handler on rank 0
    # the restarted benchmark removed it: its nets come from the weights files, and Lightning would
    # otherwise load (unpickle) that checkpoint in its test loop
    assert not list(slurm_run.glob("hpc_ckpt_*.ckpt"))
    assert f"job {job} restart 1" in text
    assert_resumed(slurm_run, before, reference_long.result(), log)
    assert_same_results(slurm_run, reference_long.result())


@pytest.mark.slurm
@needs_fmnist
def test_sigusr1_outside_lightning_still_requeues(cluster, work, reference_small):
    """A SIGUSR1 that arrives before the Trainer runs (no handler yet) kills the tasks; the
    script then requeues the job itself instead of letting it fail."""
    wrapper = work / "slow_python.sh"  # the tasks sleep before python starts: a known window
    wrapper.write_text(
        f'#!/bin/bash\nif [ "${{SLURM_RESTART_COUNT:-0}}" = 0 ]; then sleep 60; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    wrapper.chmod(0o755)
    job, log = submit(cluster, work, "job_early_usr1", SMALL, python=str(wrapper))
    deadline = time.monotonic() + JOB_TIMEOUT
    while "[slurm] srun" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, f"job {job} did not start\n{job_log(log)}"
        time.sleep(0.2)
    time.sleep(1)
    cluster.run("scancel", "--signal=USR1", str(job))
    wait_pending(cluster, job, log)
    cluster.release(job)
    wait_completed(cluster, job, log)
    text = log.read_text()
    assert "tasks ended by SIGUSR1 outside Lightning's handler" in text and f"job {job} restart 1" in text
    assert_same_results(run_dir(work / "job_early_usr1"), reference_small.result())


@pytest.mark.slurm
def test_local_cluster_script_starts_reports_and_stops_a_cluster():
    """The documented user path: `experiments/slurm/local_cluster.py start`, `status`, `stop`."""
    problem = missing_requirements()
    if problem:
        pytest.fail(f"the `slurm` tests start a local SLURM cluster: {problem}", pytrace=False)
    env = clean_env()  # no SLURM_CONF: the dir must come from the command line

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120
        )

    assert cli("stop").returncode == 2  # neither a dir nor $SLURM_CONF: a one-line error
    started = cli("start", "--cpus", "1")
    assert started.returncode == 0, started.stderr
    conf = next(
        ln.split("=", 1)[1] for ln in started.stdout.splitlines() if ln.startswith("export SLURM_CONF=")
    )
    base = Path(conf).parent
    try:
        pids = [
            int((base / "run" / f"{d}.pid").read_text().split()[0]) for d in ("munged", "slurmctld", "slurmd")
        ]
        status = cli("status", str(base))
        assert status.returncode == 0, status.stderr
        assert "node localhost idle" in status.stdout and "JOBID" in status.stdout
        stopped = cli("stop", str(base))
        assert stopped.returncode == 0, stopped.stderr
        assert not base.exists()
        assert not any(alive(pid) for pid in pids)
    finally:
        if base.exists():
            Cluster.attach(base).stop()


@pytest.mark.slurm
def test_requeueing_one_array_task_leaves_the_other_tasks_alone(cluster, tmp_path_factory):
    """The script's own requeue (after an early SIGUSR1) of task 1 of a 2-task array must requeue
    `<array>_1` only: `scontrol requeue $SLURM_JOB_ID` can name the whole array (Lightning #15022).
    The tasks' "python" is a stand-in: task 1 dies of SIGUSR1 on its first run, task 0 runs until
    the test has seen task 1 requeued."""
    root = tmp_path_factory.mktemp("array")
    marker = root / "task1_requeued"
    fake = root / "fake_python.sh"
    fake.write_text(
        "#!/bin/bash\n"
        'if [ "$SLURM_ARRAY_TASK_ID" = 1 ] && [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then kill -USR1 $$; fi\n'
        f'if [ "$SLURM_ARRAY_TASK_ID" = 0 ]; then for i in $(seq 600); do [ -e {marker} ] && break; sleep 0.1; done; fi\n'
        "exit 0\n"
    )
    fake.chmod(0o755)
    array = cluster.sbatch(
        BENCHMARK_SBATCH,
        "--array=0-1",
        "--gres=none",
        "--ntasks-per-node=1",
        "--cpus-per-task=1",
        "--time=00:05:00",
        f"--output={root}/task_%a.log",
        f"--chdir={root}",
        env={"EXPERIMENT": "fmnist", "ADVPURE_TRAINER": "cpu", "PYTHON": str(fake)},
    )
    task0, task1 = f"{array}_0", f"{array}_1"
    log0, log1 = root / "task_0.log", root / "task_1.log"
    deadline = time.monotonic() + JOB_TIMEOUT
    while int(cluster.job(task1).get("Restarts", 0)) < 1:
        assert time.monotonic() < deadline, f"task 1 not requeued\n{job_log(log1)}"
        time.sleep(0.2)
    assert cluster.state(task0) == "RUNNING"  # the requeue of task 1 did not touch task 0
    marker.touch()
    cluster.release(task1)
    info0 = wait_completed(cluster, task0, log0)
    info1 = wait_completed(cluster, task1, log1)
    assert int(info0["Restarts"]) == 0 and int(info1["Restarts"]) == 1
    text1 = log1.read_text()
    assert f"scontrol requeue {array}_1" in text1 and "restart 1" in text1
    assert "restart 1" not in log0.read_text()
