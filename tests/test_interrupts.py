"""Ctrl-C and SIGTERM during a benchmark: one line saying what was stored and how to resume, exit
codes 130 and 143 (Lightning alone exits 1 and 0, silently), the run dir's lock released, and a rerun
that finishes from the stored batches."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import needs_fmnist, tiny_bench
from helpers.kill import stored_rows

pytestmark = needs_fmnist


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_benchmark_says_what_was_stored_and_resumes(tmp_path, tiny_artifacts, sig, code):
    over = tiny_bench(tmp_path, tiny_artifacts, **{"benchmark.n_images": 6, "benchmark.batch_size": 2})
    cmd = [sys.executable, "-m", "advpure", "benchmark", *over]
    run = tmp_path / "runs/benchmark/fmnist"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while stored_rows(run / "records" / "rank0.sqlite", "batches") < 2 and proc.poll() is None:
        assert time.time() - t0 < 240, "no batch stored"
        time.sleep(0.05)
    assert proc.poll() is None, "finished before the signal"
    os.kill(proc.pid, sig)
    err = proc.communicate(timeout=240)[1]
    lines = [line for line in err.splitlines() if line.startswith("advpure:")]
    assert proc.returncode == code, err[-2000:]
    assert len(lines) == 1 and "interrupted" in lines[0] and str(run) in lines[0] and "rerun" in lines[0]
    assert "Traceback" not in err
    assert not (run / "results.json").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]  # the lock was released; the rerun finishes
    assert (run / "results.json").exists()
