"""Faults at the edges (issue 20): writes that would destroy files, filesystem errors (a user who
cannot write, a full disk), one writer per run directory."""

from __future__ import annotations

import errno
import io
import os
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from advpure import cli
from advpure.core import fsio
from advpure.core.errors import CheckpointError, ConfigError, RunDirError, StorageError
from advpure.core.fsio import atomic_write, reason, write_text_atomic
from advpure.core.progress import LineProgress, progress, progress_bar_callback
from advpure.importers.ncsnv2 import import_ncsnv2
from advpure.nets.weights import read_weights, save_weights
from advpure.purify.ranges import check_trained_range, purifier_sigmas
from advpure.results import RecordStore, load_records
from advpure.results.lock import (
    LOCK_NAME,
    check_other_launch,
    is_lock_owner,
    lock_run_dir,
    read_holder,
    release_run_dir,
)
from advpure.results.plots import new_figure, save
from advpure.results.rundir import open_run_dir
from advpure.results.tables import to_csv, to_json
from advpure.training.losses import geometric_sigmas
from helpers.reference_nets import ncsnv2_shapes, random_state
from helpers.unprivileged import run_as_nobody, unavailable

NGF = 4


@pytest.fixture
def umask():
    """Set a umask for the test, restored after it."""
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.fixture
def open_dir():
    """A folder under /tmp that the user nobody can reach (pytest's tmp_path is 0700), removed after."""
    d = Path(tempfile.mkdtemp(prefix="advpure-edges-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _net() -> torch.nn.Module:
    return torch.nn.Linear(3, 2)


def _ncsnv2_checkpoint(path: Path) -> Path:
    """A tiny checkpoint as ermongroup/ncsnv2 saves it (see tests/test_import.py)."""
    sd = random_state(ncsnv2_shapes(NGF, 3), 1)
    state = {"module.sigmas": geometric_sigmas(50.0, 0.01, 232), **{f"module.{k}": v for k, v in sd.items()}}
    torch.save([state, {}, 1, 10, random_state(ncsnv2_shapes(NGF, 3), 2)], path)
    return path


def _records(first: int, n: int, value: float = 1.0) -> list[tuple]:
    return [("single", "softmax", i, value) for i in range(first, first + n)]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- 1. no destructive write ---------------------------------------------------------------------
def test_save_weights_replaces_an_existing_file_only_with_force(tmp_path):
    path = save_weights(tmp_path / "score.pt", "score", {"a": 1}, _net(), {"v": 1})
    with pytest.raises(CheckpointError) as e:
        save_weights(path, "score", {"a": 1}, _net(), {"v": 2}, force_hint="train.force=true")
    assert str(e.value) == f"{path} exists; pass train.force=true to replace it"
    assert read_weights(path)["meta"] == {"v": 1}
    save_weights(path, "score", {"a": 1}, _net(), {"v": 3}, force=True)
    assert read_weights(path)["meta"] == {"v": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["score.pt"]  # no temp file left


@pytest.mark.parametrize(
    "target, message",
    [
        ("", "the weights output path is empty; give a file path"),
        ("{tmp}", "weights output {tmp} is a folder; give a file path"),
        (
            "/dev/full",
            "weights output /dev/full is not a regular file (a device, pipe or socket); give a file path",
        ),
    ],
)
def test_save_weights_refuses_empty_paths_folders_and_device_nodes_even_with_force(tmp_path, target, message):
    target = target.format(tmp=tmp_path)
    before = os.stat("/dev/full")
    with pytest.raises(CheckpointError) as e:
        save_weights(target, "score", {"a": 1}, _net(), force=True)
    assert str(e.value) == message.format(tmp=tmp_path)
    after = os.stat("/dev/full")  # the device node is still the device node
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev
    assert list(tmp_path.iterdir()) == []


def test_import_weights_never_writes_onto_its_input_or_an_existing_file(tmp_path, capsys):
    src = _ncsnv2_checkpoint(tmp_path / "checkpoint.pth")
    original = src.read_bytes()
    link = tmp_path / "link.pth"
    link.symlink_to(src)
    for out in (src, link, tmp_path / "." / "checkpoint.pth"):
        with pytest.raises(CheckpointError, match="is the input file"):
            import_ncsnv2(src, out, force=True)
    assert src.read_bytes() == original
    dst = tmp_path / "score.pt"
    assert cli.main(["import-weights", "ncsnv2", str(src), str(dst)]) == 0
    imported = dst.read_bytes()
    capsys.readouterr()
    assert cli.main(["import-weights", "ncsnv2", str(src), str(dst)]) == 1  # exists: refused
    err = capsys.readouterr().err
    assert err == f"advpure: error: {dst} exists; pass --force to replace it\n"
    assert dst.read_bytes() == imported
    # the output is checked before the input is read: a refused output never costs a conversion
    with pytest.raises(CheckpointError, match="exists; pass --force"):
        import_ncsnv2(tmp_path / "missing.pth", dst)
    import_ncsnv2(src, dst, force=True, ema=True)
    assert read_weights(dst)["meta"]["element"].startswith("ema_shadow")


def test_every_atomic_write_gives_the_usual_mode(tmp_path, umask):
    umask(0o022)
    paths = [
        save_weights(tmp_path / "w.pt", "score", {}, _net()),
        write_text_atomic(tmp_path / "results.md", "x"),
        to_csv([{"a": 1.0}], tmp_path / "results.csv"),
        to_json([{"a": 1.0}], tmp_path / "results.json", {}),
        save(new_figure(1, 1), tmp_path / "plots" / "p.png"),
    ]
    assert [_mode(p) for p in paths] == [0o644] * len(paths)
    umask(0o007)
    assert _mode(save_weights(tmp_path / "w2.pt", "score", {}, _net())) == 0o660
    assert _mode(write_text_atomic(tmp_path / "results.md", "y")) == 0o660  # a replaced file too
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary files left


def test_atomic_write_refuses_a_folder_and_keeps_the_old_file_when_the_block_fails(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(StorageError, match="is a folder"):
        write_text_atomic(tmp_path / "d", "x", what="results file")
    path = write_text_atomic(tmp_path / "results.md", "old")
    with pytest.raises(KeyError), atomic_write(path, text=True) as f:
        f.write("half")
        raise KeyError("the writer failed half way")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["d", "results.md"]


# --- 2. filesystem errors as one line ------------------------------------------------------------
def test_reasons_name_the_common_filesystem_errors():
    assert reason(OSError(errno.EROFS, "x")) == "read-only file system"
    assert reason(OSError(errno.ENOSPC, "x")) == "no space left on device"
    assert reason(PermissionError(errno.EACCES, "x")) == "permission denied"
    assert reason(OSError(errno.EDQUOT, "x")) == "disk quota exceeded"
    assert reason(sqlite3.OperationalError("attempt to write a readonly database")).startswith("read-only")
    assert reason(sqlite3.OperationalError("database or disk is full")) == "no space left on device"


def test_no_space_left_while_writing_weights_or_a_report_is_one_line_and_keeps_the_old_file(
    tmp_path, monkeypatch
):
    path = save_weights(tmp_path / "score.pt", "score", {}, _net(), {"v": 1})
    report = write_text_atomic(tmp_path / "results.md", "old")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsio.os, "fsync", full)
    with pytest.raises(StorageError) as e:
        save_weights(path, "score", {}, _net(), {"v": 2}, force=True)
    assert str(e.value) == f"cannot write weights file {path}: no space left on device"
    assert e.value.exit_code == 1
    with pytest.raises(
        StorageError, match=r"cannot write results file .*results\.md: no space left on device"
    ):
        write_text_atomic(report, "new", what="results file")
    monkeypatch.undo()
    assert read_weights(path)["meta"] == {"v": 1} and report.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.md", "score.pt"]


def test_a_full_disk_under_the_record_store_is_one_line_and_the_stored_batches_stay_resumable(tmp_path):
    path = tmp_path / "records" / "rank0.sqlite"
    store = RecordStore(path.parent.mkdir() or path)
    store.write_batch("adp", "pgd", 0, 0, 4, _records(0, 4))
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    store._conn.execute(f"PRAGMA max_page_count = {pages}")  # sqlite's SQLITE_FULL: the disk is full
    big = {i: torch.rand(20000) for i in range(4, 8)}
    with pytest.raises(StorageError) as e:
        store.write_batch("adp", "pgd", 1, 4, 4, _records(4, 4), traces=big)
    assert str(e.value) == f"cannot write results store {path}: no space left on device"
    assert not store.is_done("adp", "pgd", 1) and store.is_done("adp", "pgd", 0)
    store.close()
    assert [r.idx for r in load_records(tmp_path)] == [0, 1, 2, 3]
    with RecordStore(path) as again:  # space again: the rerun stores the missing batch
        again.write_batch("adp", "pgd", 1, 4, 4, _records(4, 4), traces=big)
    assert [r.idx for r in load_records(tmp_path)] == list(range(8))


@pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))
def test_a_user_who_cannot_write_gets_one_line_and_nothing_stored_is_lost(open_dir):
    """As the unprivileged user nobody: import-weights into a root-owned folder (exit 1, one line),
    a write to a root-owned results store, and opening a root-owned run dir."""
    src = _ncsnv2_checkpoint(open_dir / "checkpoint.pth")
    src.chmod(0o644)
    ro = open_dir / "ro"
    run = ro / "run"
    with RecordStore.for_rank(run, 0) as store:
        store.write_batch("adp", "pgd", 0, 0, 3, _records(0, 3))
    for p in [ro, *ro.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    out = ro / "score.pt"
    warm = open_dir / "warm"
    warm.mkdir(mode=0o777)
    proc = run_as_nobody(
        warmup=f"""
        from advpure import cli
        from advpure.core.errors import AdvpureError
        from advpure.results import RecordStore
        from advpure.results.rundir import open_run_dir
        assert cli.main(["import-weights", "ncsnv2", {str(src)!r}, {str(warm / "w.pt")!r}]) == 0
        with RecordStore({str(warm / "s.sqlite")!r}) as s:
            s.write_batch("a", "b", 0, 0, 1, [("single", "softmax", 0, 1.0)])
        """,
        code=f"""
        rc = cli.main(["import-weights", "ncsnv2", {str(src)!r}, {str(out)!r}])
        print("rc", rc)
        for step in ("store", "run_dir"):
            try:
                if step == "store":
                    with RecordStore({str(run / "records" / "rank0.sqlite")!r}) as s:
                        s.write_batch("adp", "pgd", 1, 3, 2, [("single", "softmax", i, 1.0) for i in (3, 4)])
                else:
                    open_run_dir({str(run)!r}, {{"base": "b", "units": {{}}}}, config_yaml="", section="benchmark",
                                 things="results", base_what="x", delete=None, resume=True, overwrite=False, rank=0)
                print(step, "no error")
            except AdvpureError as e:
                print(step, type(e).__name__, e.exit_code, e)
        """,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == f"advpure: error: cannot write weights file {out}: permission denied\n"
    lines = proc.stdout.splitlines()
    assert "rc 1" in lines
    store_path = run / "records" / "rank0.sqlite"
    assert f"store StorageError 1 cannot write results store {store_path}: read-only " in "\n".join(lines)
    assert f"run_dir StorageError 1 cannot create run dir lock {run / LOCK_NAME}: permission denied" in lines
    assert not out.exists()
    assert [r.idx for r in load_records(run)] == [0, 1, 2]  # what was stored is intact


# --- 3. one writer per run directory -------------------------------------------------------------
HOLD = """
import sys, time
sys.path.insert(0, {src!r})
from advpure.results.lock import lock_run_dir
lock_run_dir({run!r}, rank=0)
print("locked", flush=True)
time.sleep(60)
"""


def _holder(run: Path, env: dict | None = None) -> subprocess.Popen:
    src = str(Path(__file__).resolve().parents[1] / "src")
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(src=src, run=str(run))],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _open(run: Path, rank: int = 0) -> Path:
    return open_run_dir(
        run, {"base": "b", "units": {"u": "1"}}, config_yaml="x: 1\n", section="benchmark", things="results",
        base_what="data", delete=lambda *a: None, resume=True, overwrite=False, rank=rank,
    )  # fmt: skip


def test_a_second_process_on_a_run_dir_is_refused_naming_the_holder_until_it_dies(tmp_path):
    run = tmp_path / "run"
    other = _holder(run)
    try:
        with pytest.raises(RunDirError) as e:
            _open(run)
        host = socket.gethostname()
        assert str(e.value).startswith(f"{run} is in use by another run (pid {other.pid} on {host}, since ")
        assert str(e.value).endswith(
            f"lock file {run / LOCK_NAME}); wait for it to end or use another benchmark.run_dir"
        )
        assert "\n" not in str(e.value)
        assert not (run / "manifest.json").exists()  # refused before anything was written
    finally:
        os.kill(other.pid, signal.SIGKILL)  # a dead holder's lock is released by the kernel
        other.wait()
    try:
        assert _open(run) == run and (run / "manifest.json").exists()
        assert read_holder(run / LOCK_NAME)["pid"] == os.getpid()
        assert _open(run) == run  # re-entrant in one process
    finally:
        release_run_dir(run)
    again = _holder(run)  # released: another process takes it
    os.kill(again.pid, signal.SIGKILL)
    again.wait()


def test_ranks_other_than_zero_never_lock_and_refuse_only_another_launch(tmp_path, monkeypatch):
    run = tmp_path / "run"
    for var in ("SLURM_JOB_ID", "SLURM_STEP_ID", "TORCHELASTIC_RUN_ID", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert is_lock_owner(0) and not is_lock_owner(1)
    monkeypatch.setenv("LOCAL_RANK", "1")  # a rank started by Lightning's subprocess launcher
    assert not is_lock_owner(0)
    monkeypatch.delenv("LOCAL_RANK")
    other = _holder(run, {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0"})
    try:
        t0 = time.monotonic()
        monkeypatch.setenv("SLURM_JOB_ID", "7")
        monkeypatch.setenv("SLURM_STEP_ID", "0")
        assert lock_run_dir(run, rank=1) is None  # rank 1 of the holder's own launch: goes on
        monkeypatch.setenv("SLURM_JOB_ID", "8")  # rank 1 of another job: refused at once
        with pytest.raises(RunDirError, match=f"in use by another run \\(pid {other.pid} on "):
            check_other_launch(run)
        assert time.monotonic() - t0 < 5
    finally:
        os.kill(other.pid, signal.SIGKILL)
        other.wait()
    check_other_launch(run)  # the holder is dead: its record no longer refuses anyone


# --- progress in logs ----------------------------------------------------------------------------
class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_to_a_file_is_a_plain_line_every_interval_with_rate_and_eta():
    out, clock = io.StringIO(), _Clock()
    bar = LineProgress(100, "attack pgd", stream=out, every_s=30, clock=clock)
    for _ in range(100):
        clock.t += 1.0  # one iteration per second
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0] == "[advpure] attack pgd: 30/100 (30%), 1 it/s, elapsed 0:00:30, ETA 0:01:10"
    assert len(lines) == 4 and lines[-1].startswith("[advpure] attack pgd: 100/100 (100%), 1 it/s")
    assert isinstance(progress(10, "x", stream=io.StringIO()), LineProgress)


def test_progress_on_a_terminal_is_a_redrawn_tqdm_bar():
    tty = _Tty()
    bar = progress(3, "attack pgd", stream=tty)
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert not isinstance(bar, LineProgress) and "\r" in tty.getvalue()
    assert type(progress_bar_callback(stream=_Tty())).__name__ == "TQDMProgressBar"


def test_lightning_progress_to_a_file_prints_lines_not_redraws(tmp_path):
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)

        def training_step(self, batch, i):
            return self.lin(batch[0]).pow(2).mean()

        def test_step(self, batch, i):
            self.lin(batch[0])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(12, 2)), batch_size=4)
    out = io.StringIO()
    callback = progress_bar_callback(every_s=0, stream=out)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False, enable_model_summary=False,
        callbacks=[callback], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(Tiny(), data)
    trainer.test(Tiny(), data, verbose=False)
    text = out.getvalue()
    assert "\r" not in text and type(callback).__name__ == "LineProgressBar"
    lines = text.splitlines()
    for epoch in (0, 1):
        assert any(ln.startswith(f"[advpure] Training epoch {epoch}: 3/3 (100%), ") for ln in lines)
    assert any(ln.startswith("[advpure] Testing: 3/3 (100%), ") and " batch/s, " in ln for ln in lines)
    assert all(", ETA " in ln for ln in lines)


# --- values outside the trained range ------------------------------------------------------------
def test_a_screening_sigma_outside_the_score_nets_dsm_levels_is_one_line_with_the_range():
    meta = {"dsm_sigma_min": 0.01, "dsm_sigma_max": 0.5}
    adp = {"kind": "adp", "field": "dsm", "sigma": 1e6}
    with pytest.raises(ConfigError) as e:
        check_trained_range(purifier_sigmas(adp), meta)
    assert str(e.value) == (
        "defense.sigma=1e+06 is outside the score net's DSM noise levels [0.01, 0.5]; retrain it with "
        "score.dsm_sigma_min/score.dsm_sigma_max covering 1e+06 or choose a value in that range"
    )
    assert check_trained_range(
        {"defense.sigma": 0.0, "benchmark.sigmas[0]": 0.0, "defense.sigma_x": None}, meta
    ) == (
        0.01,
        0.5,
    )  # sigma 0: no screening noise
    with pytest.raises(ConfigError, match=r"^benchmark.sigmas\[1\]=0.75 is outside .* \[0.01, 0.5\]"):
        check_trained_range({"benchmark.sigmas[0]": 0.25, "benchmark.sigmas[1]": 0.75}, meta)
    langevin = {"kind": "langevin", "sigma": 0.25, "dsm_sigma": 0.005}
    assert purifier_sigmas(langevin, "defenses.lgv") == {
        "defenses.lgv.sigma": 0.25,
        "defenses.lgv.dsm_sigma": 0.005,
    }
    with pytest.raises(ConfigError, match=r"^defenses.lgv.dsm_sigma=0.005 is outside"):
        check_trained_range(purifier_sigmas(langevin, "defenses.lgv"), meta)
    with pytest.raises(
        ConfigError, match=r"^defense.sigma_star=80 is outside the score net's DSM noise levels \[0.01, 50\]"
    ):
        check_trained_range(
            purifier_sigmas({"kind": "ve", "sigma_star": 80.0}), {"dsm_sigma_min": 0.01, "dsm_sigma_max": 50}
        )
    assert purifier_sigmas({"kind": "adp", "field": "ebm", "sigma": 9.0}) == {}  # an EBM has no DSM levels
    with pytest.raises(ConfigError, match=r"^defense.sigma=0.3 is outside .* \[0.25, 0.25\]"):
        check_trained_range({"defense.sigma": 0.3}, {"dsm_sigma_fixed": 0.25})
    with pytest.raises(ConfigError, match="noise range is unknown"):
        check_trained_range({"defense.sigma": 0.25}, {})


def test_a_cache_folder_that_cannot_be_created_is_one_line(tmp_path, monkeypatch):
    from advpure.core.runtime import CACHE_VARS, CONFIG_VARS, redirect_writes

    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the cache folder would go
    for var in [*CACHE_VARS, *CONFIG_VARS]:  # set: redirect_writes leaves them alone (restored after)
        monkeypatch.setenv(var, str(tmp_path))
    monkeypatch.delenv("TMPDIR")  # the one it sets (restored after the test)
    with pytest.raises(StorageError) as e:
        redirect_writes(blocker / "cache")
    assert (
        str(e.value)
        == f"cannot create cache folder (paths.cache) {blocker / 'cache' / 'tmp'}: a part of the path is not a folder"
    )
