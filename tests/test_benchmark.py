"""`advpure benchmark` end to end on tiny trained nets: files, numbers from records, W&B, resume
after kill -9, DDP = 1 rank, the sanity checks of a credible evaluation (Carlini et al. 2019), and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from advpure.config import compose as C
from advpure.core.errors import CheckpointError, ConfigError, RunDirError
from advpure.results import load_batches, load_records, read_csv, read_json
from conftest import needs_fmnist, tiny_bench
from helpers.kill import kill_9_after
from helpers.wandb_offline import find_run_files, read_run

pytestmark = needs_fmnist


def run_bench(tmp, artifacts, **extra):
    from advpure.jobs.benchmark import benchmark

    cfg = C.load("fmnist", tiny_bench(tmp, artifacts, **extra))
    benchmark(cfg)
    return cfg, Path(cfg.benchmark.run_dir)


def by_key(records):
    return {r.key: r.value for r in records}


def test_end_to_end_files_numbers_and_wandb(tmp_path, tiny_artifacts):
    every = "[single,worst_of_n,mean_of_n,ever_broken,dwbox]"
    cfg, run = run_bench(
        tmp_path,
        tiny_artifacts,
        **{"logger.kind": "wandb", "benchmark.protocols": every, "benchmark.checks": "true"},
    )
    for name in (
        "config.yaml",
        "manifest.json",
        "results.json",
        "results.csv",
        "results.md",
        "records/rank0.sqlite",
        "plots/loss_curves.png",
    ):
        assert (run / name).is_file(), name
    assert list((run / "plots").glob("grid_adp_s0.25_*.png"))
    rows, meta = read_json(run / "results.json")
    assert read_csv(run / "results.csv") == rows
    # every number in the table equals the one recomputed by hand from the per-sample records
    recs = load_records(run)
    vals = defaultdict(list)
    for r in recs:
        vals[(r.defense, r.attack, r.protocol, r.merge)].append(r.value)
    assert {r.defense for r in recs} == {"none", "adp_s0.25"}
    for row in rows:
        for p in ("single", "worst_of_n", "mean_of_n", "ever_broken"):
            v = vals.get((row["defense"], row["attack"], p, row["merge"]))
            if v:
                assert row[p] == pytest.approx(sum(v) / len(v))
                assert row["n"] == len(v) == 7
    nat = {(r["defense"], r["merge"]): r["single"] for r in rows if r["attack"] == "natural"}
    for row in rows:
        assert row["natural"] == pytest.approx(nat[(row["defense"], row["merge"])])
    md = (run / "results.md").read_text()
    assert (
        "first 7 test images" in md and "eps 0.15" in md and "not measured here" in md and "BPDA2+EOT2" in md
    )
    # the worst case over attacks per defense, the DW-box column with the floors, the Checks section
    assert "Worst case (all attacks; images every attack covered)" in md and "| DW-box |" in md
    assert "Worst-of-N floor" in md and "Ever-broken floor" in md and "## Checks" in md
    wc = next(
        r
        for r in rows
        if r["defense"] == "adp_s0.25" and r["attack"] == "worst_case" and r["merge"] == "softmax"
    )
    per_attack = [
        r
        for r in rows
        if r["defense"] == "adp_s0.25" and r["merge"] == "softmax" and r["attack"] in cfg.attacks
    ]
    assert wc["single"] <= min(r["single"] for r in per_attack) and wc["n"] == 7
    # DW-box ran for the attacks whose protocols include it (fmnist.yaml leaves it out for the blind PGD)
    for r in per_attack:
        wanted = cfg.attacks[r["attack"]].protocols or cfg.benchmark.protocols
        assert (r["dwbox"] is not None) == ("dwbox" in wanted), r["attack"]
    assert any(r["dwbox"] is not None for r in per_attack)
    # the checks' re-runs are stored and named in the Checks section, never rows of the tables above it
    tables, checks = md.split("## Checks")
    assert "@unbounded" not in tables and "@unbounded" in checks
    assert any(r["attack"].endswith("@unbounded") for r in rows)
    # the header states each attack's step; 2 x 0.03 < eps: the fixed-step attacks cannot reach eps
    assert "(steps PGD3 (classifier, blind) 0.01, BPDA2+EOT2 0.03, PGD2-EOT2 (full gradient) 0.03)" in md
    assert "| reaches_eps |" in checks and "BPDA2+EOT2: 2 x 0.03 = 0.06 < eps 0.15" in checks
    # the offline W&B run holds the same numbers under natural/... and robust/... keys
    files = find_run_files(run)
    assert len(files) == 1
    summary = read_run(files[0])["summary"]
    soft = [r for r in rows if r["merge"] == "softmax"]
    for r in soft:
        if r["attack"] == "natural":
            assert summary[f"natural/{r['defense']}"] == pytest.approx(r["single"], abs=1e-6)
        else:
            for p in ("single", "worst_of_n", "ever_broken", "dwbox", "ever_broken_floor"):
                if r.get(p) is not None:  # check runs record the single draw only
                    assert summary[f"robust/{r['defense']}/{r['attack']}/{p}"] == pytest.approx(
                        r[p], abs=1e-6
                    )
    # score-network evaluations are counted: none for the bare classifier, some for ADP
    cost = {(r["defense"], r["attack"]): r["score_evals_per_img"] for r in soft}
    assert cost[("none", "pgd40_blind")] == 0 and cost[("adp_s0.25", "bpda40_eot15")] > 0


def test_sanity_eps_zero_identity_bpda_and_undefended_pgd(tmp_path, tiny_artifacts):
    """Sanity check: eps = 0 gives robust = natural sample by sample (every attack and protocol);
    identity purifier makes BPDA = PGD (the third check, undefended PGD-40 -> ~0%, needs the
    fully trained default classifier: tests/test_slow.py)."""
    attacks = "[pgd40_blind,bpda40_eot15,pgd200_eot20_full,joint_score_eot15,joint_full_eot15,spsa,apgd100_eot20_ce]"
    extra = {
        "attack": attacks,
        "benchmark.undefended_attacks": "[pgd40_blind,bpda40_eot15]",
        "attacks.joint_score_eot15.iters": 2,
        "attacks.joint_score_eot15.eot": 2,
        "attacks.joint_full_eot15.iters": 2,
        "attacks.joint_full_eot15.eot": 2,
        "attacks.spsa.iters": 2,
        "attacks.spsa.samples": 4,
        "attacks.apgd100_eot20_ce.iters": 3,
        "attacks.apgd100_eot20_ce.eot": 2,
    }
    zero = {f"attacks.{a}.eps": 0.0 for a in attacks.strip("[]").split(",")}
    protocols = {"benchmark.protocols": "[single,worst_of_n,mean_of_n,ever_broken,dwbox]"}
    _, run = run_bench(tmp_path / "zero", tiny_artifacts, **extra, **zero, **protocols)
    recs = by_key(load_records(run))
    checked = 0
    for (d, a, p, m, i), v in recs.items():
        if a != "natural" and p in ("single", "worst_of_n", "mean_of_n", "dwbox"):
            assert v == recs[(d, "natural", p, m, i)], (d, a, p, m, i)
            checked += 1
        if p == "worst_of_n_floor":  # the floor is the protocol at eps = 0 with as many evaluations
            assert v == recs[(d, "natural", "worst_of_n", m, i)], (d, a, p, m, i)
            checked += 1
    # 7 images x 3 merge rules x 5 protocols x 9 units, less DW-box for the 5 units the experiment runs
    # without it (their own `protocols`: blind PGD on both defenses, joint score, joint full, SPSA)
    assert checked == 7 * 3 * (5 * 9 - 5)

    _, run = run_bench(
        tmp_path / "pgd",
        tiny_artifacts,
        **{
            "attack": "[pgd40_blind,bpda40_eot15]",
            "benchmark.undefended_attacks": "[pgd40_blind,bpda40_eot15]",
            "attacks.pgd40_blind.iters": 10,
            "attacks.bpda40_eot15.iters": 10,
            "attacks.bpda40_eot15.step": 0.01,  # the blind PGD's step: the same attack through the identity
            "benchmark.n_images": 20,
            "benchmark.batch_size": 10,
            "defense.kind": "none",
        },
    )
    recs = by_key(load_records(run))
    pgd = {k[4]: v for k, v in recs.items() if k[:4] == ("none", "pgd40_blind", "single", "softmax")}
    bpda = {k[4]: v for k, v in recs.items() if k[:4] == ("none", "bpda40_eot15", "single", "softmax")}
    assert pgd == bpda and len(pgd) == 20  # identity purifier: BPDA is classifier PGD
    nat = {k[4]: v for k, v in recs.items() if k[:4] == ("none", "natural", "single", "softmax")}
    assert sum(pgd.values()) < sum(nat.values())  # and the attack does something


def _bench_cmd(tmp, artifacts, **extra):
    return [sys.executable, "-m", "advpure", "benchmark", *tiny_bench(tmp, artifacts, **extra)]


def test_kill_9_then_rerun_gives_identical_results_without_redoing_batches(tmp_path, tiny_artifacts):
    extra = {
        "benchmark.n_images": 8,
        "benchmark.batch_size": 2,
        "attacks.bpda40_eot15.iters": 4,
        "attacks.pgd200_eot20_full.iters": 3,
    }
    ref = tmp_path / "ref"
    subprocess.run(_bench_cmd(ref, tiny_artifacts, **extra), check=True, capture_output=True, timeout=600)
    ref_rows, _ = read_json(ref / "runs/benchmark/fmnist/results.json")

    work = tmp_path / "work"
    store = work / "runs/benchmark/fmnist/records/rank0.sqlite"
    logged = {**extra, "logger.kind": "wandb"}  # one W&B run for the run dir, across the kill
    kill_9_after(_bench_cmd(work, tiny_artifacts, **logged), store, "batches", 4, poll=0.05)
    assert not (work / "runs/benchmark/fmnist/results.json").exists(), "finished before the kill"
    before = {(b.defense, b.attack, b.batch): b for b in load_batches(work / "runs/benchmark/fmnist")}
    assert before
    again = subprocess.run(
        _bench_cmd(work, tiny_artifacts, **logged), capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr[-3000:]
    runs = sorted((work / "runs/benchmark/fmnist/wandb").glob("offline-run-*"))
    assert (
        runs and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1
    )  # one run id: `wandb sync` makes one run
    assert all(f.stat().st_size > 7 for r in runs for f in r.glob("run-*.wandb"))  # no empty run left
    after = {(b.defense, b.attack, b.batch): b for b in load_batches(work / "runs/benchmark/fmnist")}
    for k, b in before.items():
        assert after[k].seconds == b.seconds  # not redone: its stored timing is untouched
    rows, _ = read_json(work / "runs/benchmark/fmnist/results.json")
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds_per_img"} for r in rs]  # noqa: E731
    assert strip(rows) == strip(ref_rows)


def test_a_w_and_b_service_inherited_from_the_parent_is_not_used(tmp_path, tiny_artifacts):
    # a parent that used W&B (pytest, a notebook) leaves its service address in WANDB_SERVICE; a
    # killed child's run would stay open there and the rerun be refused ("run ID ... is in use")
    env = {**os.environ, "WANDB_SERVICE": "2-1-tcp-localhost-9"}  # a service that is not there
    cmd = _bench_cmd(tmp_path, tiny_artifacts, **{"benchmark.n_images": 2, "logger.kind": "wandb"})
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = list((tmp_path / "runs/benchmark/fmnist/wandb").glob("offline-run-*/run-*.wandb"))
    assert runs and all(f.stat().st_size > 7 for f in runs)


@pytest.mark.ddp
def test_two_ddp_ranks_equal_one_rank_on_an_odd_number_of_images(tmp_path, tiny_artifacts):
    extra = {"benchmark.n_images": 7, "benchmark.batch_size": 2}
    _, one = run_bench(tmp_path / "one", tiny_artifacts, **extra)
    _, two = run_bench(
        tmp_path / "two", tiny_artifacts, **extra, **{"trainer.devices": 2, "trainer.strategy": "ddp_fork"}
    )
    assert sorted(p.name for p in (two / "records").iterdir() if p.suffix == ".sqlite") == [
        "rank0.sqlite",
        "rank1.sqlite",
    ]
    a, b = by_key(load_records(one)), by_key(load_records(two))
    assert a == b and len({k[4] for k in a}) == 7
    ra, _ = read_json(one / "results.json")
    rb, _ = read_json(two / "results.json")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("seconds_per_img",)} for r in rs]  # noqa: E731
    assert strip(ra) == strip(rb)


def test_bad_input_is_refused_before_anything_is_overwritten(tmp_path, tiny_artifacts):
    from advpure.jobs.benchmark import benchmark

    # missing weights with training disabled
    cfg = C.load("fmnist", tiny_bench(tmp_path / "a", tmp_path / "nothing"))
    with pytest.raises(CheckpointError, match="missing weights"):
        benchmark(cfg)
    # an attack that needs a score network on the undefended model
    with pytest.raises(ConfigError, match="needs a purifier"):
        benchmark(
            C.load(
                "fmnist",
                tiny_bench(
                    tmp_path / "b",
                    tiny_artifacts,
                    **{
                        "attack": "[joint_score_eot15]",
                        "benchmark.undefended_attacks": "[joint_score_eot15]",
                    },
                ),
            )
        )
    # a run dir written by another config is refused, its records untouched
    cfg, run = run_bench(tmp_path / "c", tiny_artifacts)
    snapshot = (run / "records" / "rank0.sqlite").read_bytes()
    with pytest.raises(RunDirError, match="other settings"):
        benchmark(
            C.load("fmnist", tiny_bench(tmp_path / "c", tiny_artifacts, **{"attacks.bpda40_eot15.eot": 3}))
        )
    assert (run / "records" / "rank0.sqlite").read_bytes() == snapshot
    # ... unless asked: overwrite discards the old records
    benchmark(
        C.load(
            "fmnist",
            tiny_bench(
                tmp_path / "c",
                tiny_artifacts,
                **{"attacks.bpda40_eot15.eot": 3, "benchmark.overwrite": "true"},
            ),
        )
    )
    assert json.loads((run / "manifest.json").read_text())["units"]
    # adding a new defense sigma to the same run dir is allowed (new units, same base settings)
    benchmark(
        C.load(
            "fmnist",
            tiny_bench(
                tmp_path / "c",
                tiny_artifacts,
                **{"defense.sigma": 0.1, "benchmark.undefended": "false", "attacks.bpda40_eot15.eot": 3},
            ),
        )
    )
    assert {r.defense for r in load_records(run)} == {"none", "adp_s0.25", "adp_s0.1"}
    # a corrupt store is a clear error
    (run / "records" / "rank0.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(RunDirError, match="corrupt results store"):
        benchmark(
            C.load("fmnist", tiny_bench(tmp_path / "c", tiny_artifacts, **{"attacks.bpda40_eot15.eot": 3}))
        )
    # more devices than the machine has
    with pytest.raises(ConfigError, match="trainer.devices=64"):
        benchmark(C.load("fmnist", tiny_bench(tmp_path / "d", tiny_artifacts, **{"trainer.devices": 64})))
