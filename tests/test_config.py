"""Config composition, overrides and their one-line errors; the CLI's exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from advpure.config import compose as C
from advpure.core.errors import ConfigError


def test_experiment_composes_groups_and_deltas():
    cfg = C.load("fmnist")
    assert cfg.experiment == "fmnist"
    assert cfg.data.name == "fmnist" and cfg.data.eps == pytest.approx(0.15)
    assert cfg.classifier.arch == "small_cnn" and cfg.classifier.optim.name == "adam"  # group file
    assert cfg.score.ngf == 16  # conf/score/ncsnv2_small.yaml
    assert cfg.defense.kind == "adp" and cfg.defense.sigma == 0.25 and cfg.defense.lam == 0.05  # group file
    assert cfg.defense.replicas == 4  # the experiment's delta over conf/defense/adp.yaml (10)
    assert "bpda40_eot15" in cfg.attacks and cfg.attacks.bpda40_eot15.eot == 4
    assert C.load("cifar10_paper").attacks.bpda40_eot15.eot == 15
    assert cfg.attacks.bpda40_eot15.name == "bpda40_eot15"
    assert cfg.classifier.weights == "artifacts/fmnist/classifier.pt"  # interpolation resolved


def test_cifar_paper_settings():
    cfg = C.load("cifar10_paper")
    assert cfg.classifier.arch == "wrn28_10" and cfg.classifier.dropout == 0.3
    o = cfg.classifier.optim
    assert (o.name, o.lr, o.momentum, o.weight_decay) == ("sgd", 0.1, 0.9, 5e-4)
    assert cfg.trainer.max_epochs == 200 and cfg.data.batch_size == 128
    assert cfg.data.crop_padding == 4 and cfg.data.hflip
    assert cfg.data.eps == pytest.approx(8 / 255) and cfg.data.step == pytest.approx(2 / 255)
    s = cfg.score
    assert (s.ngf, s.dsm_sigma_max, s.dsm_sigma_min, s.dsm_levels, s.ema_decay, s.max_steps) == (
        128,
        50.0,
        0.01,
        232,
        0.999,
        300000,
    )
    assert list(cfg.benchmark.sigmas) == [0.1, 0.25] and cfg.benchmark.n_images == 10000


def test_extends_merges_parent_and_child():
    cfg = C.load("cifar10_sigma_sweep")
    assert cfg.classifier.arch == "wrn28_10"  # from the parent
    assert list(cfg.attacks) == ["bpda40_eot15", "pgd200_eot20_full"]  # child's group selection
    assert cfg.benchmark.n_images == 1000 and 0.5 in cfg.benchmark.sigmas


def test_command_line_overrides_win_in_order():
    cfg = C.load(
        "fmnist",
        [
            "trainer.max_epochs=7",
            "defense=none",
            "attack=[spsa]",
            "attacks.spsa.iters=3",
            "logger.tags=[a,b]",
            "data.root=null",
        ],
    )
    assert cfg.trainer.max_epochs == 7
    assert cfg.defense.kind == "none"
    assert list(cfg.attacks) == ["spsa"] and cfg.attacks.spsa.iters == 3
    assert list(cfg.logger.tags) == ["a", "b"] and cfg.data.root is None


def test_experiment_given_on_the_command_line():
    assert C.load(None, ["experiment=cifar10_paper"]).data.name == "cifar10"


@pytest.mark.parametrize(
    "override, pieces",
    [
        ("data.foo=1", ["data.foo", "allowed here", "batch_size"]),
        ("foo.bar=1", ["foo.bar", "allowed"]),
        ("data.batch_size=abc", ["data.batch_size", "abc"]),
        ("trainer.max_epochs=-1", ["trainer.max_epochs", ">= 0"]),
        ("data.batch_size=0", ["data.batch_size", ">= 1"]),
        ("defense.merge=max", ["defense.merge", "softmax, logits, vote"]),
        ("defense.noise=uniform", ["defense.noise", "gaussian, rademacher"]),
        ("defense.steps=0", ["defense.steps"]),
        ("defense.replicas=0", ["defense.replicas"]),
        ("defense.sigma=-0.1", ["defense.sigma"]),
        ("data=tinyimagenet", ["data option 'tinyimagenet'", "fmnist"]),
        ("attack=[nope]", ["attack option 'nope'", "bpda40_eot15"]),
        ("experiment=nope", ["experiment 'nope'", "fmnist"]),
        ("attacks.nope.iters=1", ["attack 'nope' is not selected"]),
        ("attacks.spsa.eps=-1", ["attacks.spsa.eps"]),
        ("attacks.spsa.step=0", ["attacks.spsa.step"]),
        ("attacks.bpda40_eot15.eot=0", ["attacks.bpda40_eot15.eot"]),
        ("attacks.bpda40_eot15.kind=fgsm", ["attack kind 'fgsm'", "pgd"]),
        ("score.dsm_sigma_min=100", ["dsm_sigma_min", "dsm_sigma_max"]),
        ("score.dsm_levels=0", ["score.dsm_levels"]),
        ("score.sigma_min=0.1", ["score.sigma_min", "renamed", "score.dsm_sigma_min"]),
        ("attacks.spsa.spsa_samples=3", ["attacks.spsa.spsa_samples", "renamed", "samples"]),
        ("defense.langevin_eta=0.1", ["defense.langevin_eta", "not a parameter of defense kind 'adp'"]),
        ("defense.sigma=nan", ["defense.sigma", "finite"]),
        ("defense.sigma=.inf", ["defense.sigma", "finite"]),
        ("data.eps=.nan", ["data.eps", "finite"]),
        ("benchmark.sigmas=[0.1,.nan]", ["benchmark.sigmas", "finite"]),
        ("data.eps=8", ["data.eps", "<= 1.0", "8/255"]),
        ("attacks.spsa.step=2", ["attacks.spsa.step", "8/255"]),
        ("defense.kind=diffusion", ["defense kind 'diffusion'", "adp, diffpure, gdmp, langevin, ve"]),
        ("benchmark.protocols=[single,best_of_n]", ["protocol 'best_of_n'", "worst_of_n"]),
        ("benchmark.protocols=[worst_of_n]", ["benchmark.protocols", "single"]),
        ("trainer.devices=0", ["trainer.devices"]),
        ("train.stages=[eval]", ["train.stages", "classifier, score"]),
        ("novalue", ["key=value"]),
    ],
)
def test_bad_overrides_are_one_line_errors_naming_the_key(override, pieces):
    with pytest.raises(ConfigError) as e:
        C.load("fmnist", [override])
    msg = str(e.value)
    assert "\n" not in msg
    for p in pieces:
        assert p in msg, (p, msg)


def test_extends_cycle_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "a.yaml").write_text("extends: b\n")
    (tmp_path / "experiment" / "b.yaml").write_text("extends: a\n")
    monkeypatch.setenv("ADVPURE_CONFIG_PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="extends itself"):
        C.load("a")


def test_fingerprint_changes_with_content():
    a, b = C.load("fmnist"), C.load("fmnist", ["defense.sigma=0.1"])
    assert C.fingerprint(a) == C.fingerprint(C.load("fmnist"))
    assert C.fingerprint(a) != C.fingerprint(b)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "advpure", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_config_prints_resolved_yaml():
    out = _cli("config", "experiment=fmnist", "defense.sigma=0.1")
    assert out.returncode == 0, out.stderr
    data = yaml.safe_load(out.stdout)
    assert (
        data["defense"]["sigma"] == 0.1 and data["classifier"]["weights"] == "artifacts/fmnist/classifier.pt"
    )


@pytest.mark.parametrize(
    "args", [("config", "data.nope=1"), ("config", "trainer.max_epochs=abc"), ("train", "data=nope")]
)
def test_cli_config_errors_exit_2_without_traceback(args):
    out = _cli(*args)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("advpure: error:")


def test_cli_unknown_command():
    out = _cli("fly")
    assert out.returncode == 2 and "unknown command" in out.stderr


def test_experiment_attack_deltas_apply_only_to_selected_attacks(tmp_path, monkeypatch):
    cfg = C.load("fmnist", ["attack=[spsa]"])
    assert list(cfg.attacks) == ["spsa"] and cfg.attacks.spsa.iters == 5  # the experiment's delta
    assert list(C.load("fmnist_sweep").attacks) == ["bpda40_eot15"]  # parent's other deltas dropped
    root = tmp_path
    (root / "experiment").mkdir()
    (root / "experiment" / "x.yaml").write_text(
        "defaults:\n  attack: [spsa]\nattacks:\n  sppsa: {iters: 2}\n"
    )
    monkeypatch.setenv("ADVPURE_CONFIG_PATH", str(root))
    with pytest.raises(ConfigError, match="attacks.sppsa: unknown attack; allowed: .*spsa"):
        C.load("x")


def test_eps_sweep_units_scale_the_step_with_eps():
    from advpure.jobs.plan import build_plan

    cfg = C.load("fmnist_sweep")
    sweep = {u.eps: u.step for u in build_plan(cfg).units if u.sweep and u.defense == "adp_s0.1"}
    assert sorted(sweep) == [0.0, 0.05, 0.1, 0.15, 0.2]
    assert sweep[0.15] == pytest.approx(0.04) and sweep[0.05] == pytest.approx(0.04 / 3)
    assert all(s / e == pytest.approx(0.04 / 0.15) for e, s in sweep.items() if e > 0)


@pytest.mark.parametrize("name", C.experiment_names())
def test_every_experiment_composes_and_plans(name):
    """Each shipped experiment loads, validates and builds its benchmark plan (no nets needed):
    a typo in an experiment file, a defense option that does not exist or an attack that is not
    selected fails here, not hours into a cluster job."""
    from advpure.jobs.plan import build_plan

    cfg = C.load(name)
    plan = build_plan(cfg)
    assert cfg.experiment == name
    assert plan.units or cfg.certify.sigmas  # something to run
    for unit in plan.units:
        assert unit.defense in plan.defenses and unit.label


def test_experiment_may_be_a_yaml_path_and_defenses_a_flow_list_on_the_command_line(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("extends: fmnist\nbenchmark:\n  n_images: 3\n")
    cfg = C.load(None, [f"experiment={mine}", "benchmark.defenses=[langevin,{option: adp_ebm, replicas: 4}]"])
    assert cfg.experiment == "mine" and cfg.benchmark.n_images == 3
    assert cfg.benchmark.defenses[0] == "langevin" and cfg.benchmark.defenses[1]["replicas"] == 4
    with pytest.raises(ConfigError, match="experiment file not found"):
        C.load(None, [f"experiment={tmp_path / 'nope.yaml'}"])
