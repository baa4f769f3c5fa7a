"""The diffusion purifiers through the benchmark: the `fmnist_diffusion` experiment plans (every defense,
attack, protocol and check, the cited tables), and a 4-image run of DiffPure, GDMP and reverse-VE under
BPDA at eps = 0 (which must reproduce natural accuracy per sample under every protocol) and
exact-gradient PGD with majority-of-N and DW-box, on a small eps-net of the `ddpmpp` kind (score_sde's
DDPM++) trained for 2 steps."""

from __future__ import annotations

from pathlib import Path

import pytest

from advpure.config import compose as C
from conftest import needs_fmnist, tiny_bench, tiny_overrides

SMALL_DDPMPP = ["ddpmpp.nf=8", "ddpmpp.max_steps=2", "ddpmpp.batch_size=16", "ddpmpp.val_batches=1"]


def test_fmnist_diffusion_plans_every_defense_attack_protocol_and_check(tmp_path):
    from advpure.jobs.plan import build_plan, header_lines
    from advpure.purify.base import purifier_class

    cfg = C.load("fmnist_diffusion", tiny_overrides(tmp_path))
    plan = build_plan(cfg)
    assert list(plan.defenses) == ["none", "adp_s0.25", "diffpure", "ve", "gdmp"]
    assert plan.needs("diffpure") == ("classifier", "ddpmpp") and plan.needs("ve") == ("classifier", "score")
    assert "ddpmpp" in cfg.train.stages and plan.nets == {"classifier", "score", "ddpmpp"}
    table = {(u.defense, u.attack) for u in plan.table_units}
    for d in ("adp_s0.25", "diffpure", "ve", "gdmp"):
        for a in ("bpda40_eot15", "pgd200_eot20_full", "apgd100_eot20_ce", "standard_rand"):
            assert (d, a) in table
        assert purifier_class(plan.defenses[d].kind).is_stochastic(plan.defenses[d])
        checks = {u.check for u in plan.units_of(d) if u.check}
        assert checks == {"unbounded", "budget"}
    assert {"majority_of_n", "dwbox", "ever_broken", "worst_of_n"} <= set(cfg.benchmark.protocols)
    assert list(cfg.benchmark.cited)[:2] == ["diffpure_cifar10", "gdmp_cifar10"]
    lines = "\n".join(header_lines(cfg, plan))
    assert (
        "DiffPure t*=0.15: discrete diffusion to t*, then reverse VP-SDE (Euler-Maruyama), 15 steps" in lines
    )
    assert "GDMP 4x60, MSE guidance: 4 rounds of diffusing to step 60 and 6 ancestral DDPM steps" in lines
    assert "Reverse-VE σ*=0.25, em" in lines and "every 4th DSM level" in lines
    assert "majority-of-n" in lines.lower()


@needs_fmnist
@pytest.mark.slow  # trains a small DDPM++ for 2 steps, then 3 diffusion defenses x 2 attacks with DW-box
def test_diffusion_purifiers_run_through_the_benchmark(tmp_path, tiny_artifacts):
    from advpure.jobs.benchmark import benchmark
    from advpure.jobs.train import train
    from advpure.results import load_records

    over = [
        *tiny_bench(tmp_path, tiny_artifacts),
        "train.stages=[ddpmpp]",
        "ddpmpp=ddpmpp_28",
        *SMALL_DDPMPP,
    ]
    over.append(f"ddpmpp.weights={tmp_path / 'ddpmpp.pt'}")
    train(C.load("fmnist", over))
    protocols = "[single,worst_of_n,mean_of_n,majority_of_n,ever_broken,dwbox]"
    bench = {
        "defense": "diffpure",
        "defense.t_star": 0.15,
        "defense.dt": 0.05,
        "attack": "[bpda40_eot15,pgd200_eot20_full]",
        "attacks.bpda40_eot15.eps": 0.0,
        "attacks.bpda40_eot15.iters": 1,
        "benchmark.defenses": "[{option: gdmp, rounds: 1, steps: 20, respace: 2}, {option: ve, level_stride: 20}]",
        "benchmark.undefended": "false",
        "benchmark.n_images": 4,
        "benchmark.batch_size": 4,
        "benchmark.protocols": protocols,
        "benchmark.cited": "[diffpure_cifar10]",
    }
    keep = [o for o in tiny_bench(tmp_path, tiny_artifacts, **bench) if not o.startswith("defense.")]
    keep += [f"{k}={v}" for k, v in bench.items() if k.startswith("defense.")]
    keep += ["ddpmpp=ddpmpp_28", *SMALL_DDPMPP, f"ddpmpp.weights={tmp_path / 'ddpmpp.pt'}"]
    cfg = C.load("fmnist", keep)
    result = benchmark(cfg)
    names = {r["defense"] for r in result["rows"]}
    assert names == {"diffpure", "gdmp", "ve"}
    recs = load_records(Path(cfg.benchmark.run_dir))
    for d in names:
        for p in ("single", "worst_of_n", "mean_of_n", "majority_of_n", "dwbox"):
            natural = {r.idx: r.value for r in recs if (r.defense, r.attack, r.protocol) == (d, "natural", p)}
            at_zero = {
                r.idx: r.value for r in recs if (r.defense, r.attack, r.protocol) == (d, "bpda40_eot15", p)
            }
            assert natural and at_zero == natural, (d, p)  # eps = 0: natural accuracy, sample by sample
        full = {r.protocol for r in recs if (r.defense, r.attack) == (d, "pgd200_eot20_full")}
        assert {"majority_of_n", "majority_of_n_floor", "dwbox", "ever_broken"} <= full
    md = (Path(cfg.benchmark.run_dir) / "results.md").read_text()
    assert "Majority-of-N" in md and "DiffPure t*=0.15" in md and "GDMP 1x20" in md
    assert "Cited: DiffPure on CIFAR-10" in md and "Cited from the ADP paper" not in md
