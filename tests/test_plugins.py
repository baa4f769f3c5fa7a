"""Extension points: a purifier, an attack and a protocol written outside `src/` (tests/helpers/
toy_plugins.py), selected by config files, run through the whole benchmark and found in every
output; and changing one attack keeps the other blocks of an existing run directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from advpure.config import compose as C
from advpure.core.errors import ConfigError, RunDirError
from advpure.results import load_records, read_csv
from conftest import needs_fmnist, tiny_bench
from helpers.registries import isolated_registries

pytestmark = needs_fmnist


@pytest.fixture()
def user_root(tmp_path, monkeypatch):
    """A user's own config folder (ADVPURE_CONFIG_PATH, searched before the package's): one YAML per
    new kind, in the package's layout (<group>/<option>.yaml)."""
    root = tmp_path / "root"
    (root / "defense").mkdir(parents=True)
    (root / "attack").mkdir()
    (root / "defense" / "quantize.yaml").write_text(
        "kind: helpers.toy_plugins:Quantize\nlevels: 3\nreplicas: 1\n"
    )
    (root / "attack" / "fgsm.yaml").write_text("kind: helpers.toy_plugins:FGSM\n")
    monkeypatch.setenv("ADVPURE_CONFIG_PATH", str(root))
    with isolated_registries():  # the toy kinds and protocol do not outlive the test
        yield root


def test_user_purifier_attack_and_protocol_run_end_to_end(tmp_path, tiny_artifacts, user_root):
    from advpure.jobs.benchmark import benchmark

    protocols = "[single,worst_of_n,mean_of_n,ever_broken,helpers.toy_plugins:toy_majority]"
    over = tiny_bench(
        tmp_path,
        tiny_artifacts,
        **{
            "defense": "quantize",
            "attack": "[fgsm,pgd40_blind]",
            "attacks.pgd40_blind.iters": 2,
            "benchmark.undefended": "false",
            "benchmark.n_images": 4,
            "benchmark.batch_size": 4,
            "benchmark.protocols": protocols,
            "logger.kind": "wandb",
        },
    )
    over = [o for o in over if not o.startswith("defense.steps=")]  # an ADP key; Quantize has levels
    cfg = C.load("fmnist", over)
    assert cfg.defense.levels == 3 and cfg.defense.kind == "helpers.toy_plugins:Quantize"
    benchmark(cfg)
    run = Path(cfg.benchmark.run_dir)
    md = (run / "results.md").read_text()
    assert "Quantize L=3" in md and "FGSM (toy)" in md and "Majority-of-N (toy)" in md
    assert "robust if more than half of the N draws are correct" in md  # the protocol's legend
    rows = read_csv(run / "results.csv")
    fgsm = next(r for r in rows if r["attack"] == "fgsm" and r["merge"] == "softmax")
    assert fgsm["defense"] == "quantize" and fgsm["defense_label"] == "Quantize L=3"
    # the toy protocol's numbers are recomputed from its own per-sample records
    recs = [r for r in load_records(run) if r.attack == "fgsm" and r.merge == "softmax"]
    maj = [r.value for r in recs if r.protocol == "toy_majority"]
    assert len(maj) == 4 and fgsm["toy_majority"] == pytest.approx(sum(maj) / 4)
    single = {r.idx: r.value for r in recs if r.protocol == "single"}
    assert fgsm["single"] == pytest.approx(sum(single.values()) / 4)
    # a deterministic purifier: every draw agrees, so majority = worst = single per sample
    worst = {r.idx: r.value for r in recs if r.protocol == "worst_of_n"}
    assert {r.idx: r.value for r in recs if r.protocol == "toy_majority"} == worst == single
    # W&B: the same numbers under metric names derived from the registrations
    from helpers.wandb_offline import find_run_files, read_run

    summary = read_run(find_run_files(run)[0])["summary"]
    key = f"robust/{fgsm['defense']}/fgsm/toy_majority"
    assert summary[key] == pytest.approx(fgsm["toy_majority"], abs=1e-6)


def test_unknown_user_kinds_are_one_line_errors(user_root):
    for over, piece in [
        ("defense.kind=helpers.toy_plugins:Nope", "has no 'Nope'"),
        ("defense.kind=no_such_module:X", "cannot import module 'no_such_module'"),
        ("benchmark.protocols=[single,helpers.toy_plugins:nothing]", "has no 'nothing'"),
        ("defense.kind=helpers.toy_plugins:toy_majority", "not a subclass of Purifier"),
    ]:
        with pytest.raises(ConfigError) as e:
            C.load("fmnist", [over])
        assert piece in str(e.value) and "\n" not in str(e.value), (over, str(e.value))


def test_changing_one_attack_keeps_the_other_blocks(tmp_path, tiny_artifacts):
    from advpure.jobs.benchmark import benchmark

    base = {"attack": "[pgd40_blind,bpda40_eot15]", "benchmark.undefended": "false", "benchmark.n_images": 4}
    cfg = C.load("fmnist", tiny_bench(tmp_path, tiny_artifacts, **base))
    benchmark(cfg)
    run = Path(cfg.benchmark.run_dir)
    before = {r.key: r.value for r in load_records(run)}
    stamp = (run / "records" / "rank0.sqlite").stat().st_mtime_ns
    # the same settings again: nothing recomputed, nothing changed
    benchmark(C.load("fmnist", tiny_bench(tmp_path, tiny_artifacts, **base)))
    assert {r.key: r.value for r in load_records(run)} == before
    changed = {**base, "attacks.bpda40_eot15.iters": 3}
    with pytest.raises(RunDirError, match="adp_s0.25/bpda40_eot15"):
        benchmark(C.load("fmnist", tiny_bench(tmp_path, tiny_artifacts, **changed)))
    assert (run / "records" / "rank0.sqlite").stat().st_mtime_ns == stamp  # refused: nothing touched
    cfg = C.load("fmnist", tiny_bench(tmp_path, tiny_artifacts, **changed, **{"benchmark.overwrite": "true"}))
    kept: dict = {}

    import advpure.jobs.bench_loop as defended

    real = defended.DefendedClassifier.replay

    def spy(self, defense, attack, batch):
        done = real(self, defense, attack, batch)
        kept.setdefault((defense, attack), []).append(done)
        return done

    defended.DefendedClassifier.replay = spy
    try:
        benchmark(cfg)
    finally:
        defended.DefendedClassifier.replay = real
    after = {r.key: r.value for r in load_records(run)}
    # the PGD block and natural accuracy were replayed from the store, only BPDA was recomputed
    assert all(kept[("adp_s0.25", "pgd40_blind")]) and all(kept[("adp_s0.25", "natural")])
    assert not any(kept[("adp_s0.25", "bpda40_eot15")])
    # (the gradient-masking check runs of bpda40_eot15, `@unbounded` and `@2x`, changed with it)
    assert {k: v for k, v in after.items() if not k[1].startswith("bpda40_eot15")} == {
        k: v for k, v in before.items() if not k[1].startswith("bpda40_eot15")
    }
