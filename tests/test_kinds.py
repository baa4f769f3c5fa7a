"""A network kind written outside `src/` (tests/helpers/toy_kind.py: a time-conditioned eps(u, t) net
with its config block, training stage and importer) and a purifier that uses it, through `train`,
`import-weights`, `--help` and a 4-image benchmark, with no change under src/; and the registries of
the built-in kinds (nothing names classifier / score / ebm by hand)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from advpure import cli
from advpure.config import compose as C
from advpure.core.errors import ConfigError
from conftest import needs_fmnist, tiny_bench, tiny_overrides
from helpers.registries import isolated_registries


@pytest.fixture()
def toy_kind(tmp_path, monkeypatch):
    """The toy plugin registered (ADVPURE_PLUGINS) and a user config folder with its defense YAML."""
    conf = tmp_path / "userconf"
    (conf / "defense").mkdir(parents=True)
    (conf / "defense" / "oneshot.yaml").write_text("kind: helpers.toy_kind:OneShot\nt_star: 0.1\n")
    monkeypatch.setenv("ADVPURE_CONFIG_PATH", str(conf))
    monkeypatch.setenv("ADVPURE_PLUGINS", "helpers.toy_kind")
    with isolated_registries():
        yield conf


def test_built_in_kinds_drive_blocks_stages_groups_and_importers():
    from advpure.importers import importers
    from advpure.nets.registry import NET_KINDS

    cfg = C.load("fmnist")
    assert [k for k in NET_KINDS] == ["classifier", "score", "ebm", "ddpmpp", "ddpm", "adm"]
    assert all(k in cfg for k in NET_KINDS)
    assert C.train_stages() == ["classifier", "score", "ebm", "ddpmpp", "ddpm"]  # adm is import-only
    assert {"classifier", "score", "ebm", "ddpmpp", "ddpm", "adm"} <= set(C.groups())
    assert importers()["ncsnv2"][0] == "score" and importers()["score_sde"][0] == "ddpmpp"


def test_help_lists_the_toy_kind(toy_kind, capsys):
    assert cli.main(["--help"]) == 0
    assert "toy_eps" in capsys.readouterr().out  # its config group
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "toy_eps.width" in out and "toy_eps.max_steps" in out  # its block's keys
    assert cli.main(["import-weights", "--help"]) == 0
    assert "toy-npz" in capsys.readouterr().out
    assert cli.main(["import-weights", "toy-npz", "--help"]) == 0
    assert "--channels" in capsys.readouterr().out


def test_toy_importer_writes_weights_the_kind_loads(toy_kind, tmp_path, capsys):
    from advpure.api import load_net

    torch.manual_seed(0)
    raw = {
        "w1": torch.randn(5, 2, 3, 3),
        "b1": torch.randn(5),
        "w2": torch.randn(1, 5, 3, 3),
        "b2": torch.randn(1),
    }
    src, out = tmp_path / "toy.pth", tmp_path / "out" / "toy_eps.pt"
    torch.save(raw, src)
    assert cli.main(["import-weights", "toy-npz", str(src), str(out)]) == 0
    assert "width 5" in capsys.readouterr().out
    net = load_net(out, "toy_eps")
    assert torch.equal(net.conv1.weight, raw["w1"]) and net.schedule is not None


@needs_fmnist
def test_toy_kind_trains_and_its_purifier_runs_through_the_benchmark(toy_kind, tmp_path, tiny_artifacts):
    from advpure.jobs.benchmark import benchmark
    from advpure.jobs.train import train

    over = [*tiny_bench(tmp_path, tiny_artifacts), "train.stages=[toy_eps]", "toy_eps.max_steps=2"]
    cfg = C.load("fmnist", over)
    assert "toy_eps" in cfg and cfg.toy_eps.width == 4
    assert set(train(cfg)) == {"toy_eps"}
    weights = Path(cfg.toy_eps.weights)
    assert weights.exists()
    bench = {
        "defense": "oneshot",
        "attack": "[pgd40_blind,bpda40_eot15]",
        "benchmark.undefended": "false",
        "benchmark.n_images": 4,
        "benchmark.batch_size": 4,
    }
    over = [o for o in tiny_bench(tmp_path, tiny_artifacts, **bench) if not o.startswith("defense.steps=")]
    cfg = C.load("fmnist", over)
    result = benchmark(cfg)
    rows = {(r["defense"], r["attack"]) for r in result["rows"]}
    assert ("oneshot", "bpda40_eot15") in rows
    assert "OneShot t*=0.1" in (Path(cfg.benchmark.run_dir) / "results.md").read_text()


def test_an_attack_that_needs_a_field_is_refused_on_an_eps_net_before_any_work(toy_kind, tmp_path):
    from advpure.jobs.plan import build_plan

    over = tiny_overrides(
        tmp_path, defense="oneshot", attack="[joint_score_eot15]", **{"benchmark.undefended": "false"}
    )
    with pytest.raises(ConfigError) as e:
        build_plan(C.load("fmnist", over))
    msg = str(e.value)
    assert "joint_score_eot15" in msg and "time-free score field" in msg and "\n" not in msg
    assert not (tmp_path / "runs").exists()
