"""Projected GPU-hours of the CIFAR-10 experiments from measured per-row times (`gpu_check`).

The settings are those of experiments/cifar10_croce2022.yaml, cifar10_paper.yaml and
cifar10_certify.yaml with their defaults (conf/): copied here as constants so that `gpu_check` runs
where omegaconf is not installed; `settings_from_config` reads them from the configs and
tests/test_gpu_check.py checks that both agree.

Per-row times (seconds per image row, measured at the nets' batch shape, fp32 or bf16 autocast):
  t_s    score-net forward, no grad           t_dual  the jvp probe's dual pass (f and J v), no grad
  t_sfb  score-net forward + input backward   t_c     classifier forward, no grad
  t_cfb  classifier forward + input backward
ADP step per row (T steps per chain; every chain runs all T steps: tau = 0, an upper bound):
  step      = 2 t_s (fp32, secant probe)       | t_s + t_dual (bf16, jvp probe)
  step_grad = step + t_sfb                       (checkpointed: forward without saving, the probe,
                                                  then recompute + backward)
Per image, with n_obj = iters + 1 objective evaluations (x_0 .. x_iters), K EOT draws, S replicas,
N = benchmark.worst_of_n defended predictions at the end:
  BPDA+EOT       n_obj K (T step + t_cfb) + N S (T step + t_c)
  exact (APGD)   n_obj K (T step_grad + t_cfb) + N S (T step + t_c)
  CERTIFY        sum over sigmas and bases of (n0 + n) cost_base; cost_noisy = t_c,
                 cost_denoised = t_s + t_c, cost_adp = T step + t_c
GPU-hours = images x per-image seconds / 3600 (one GPU; no data loading, no early stopping).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

FORMULA = {
    "bpda": "n_img * [(iters+1) K (T step + t_cfb) + N S (T step + t_c)] / 3600",
    "full": "n_img * [(iters+1) K (T step_grad + t_cfb) + N S (T step + t_c)] / 3600",
    "certify": "n_img * sum_sigma sum_base (n0 + n) cost_base / 3600; noisy t_c, denoised t_s + t_c, "
    "adp T step + t_c",
    "step": "fp32 secant: 2 t_s; bf16 jvp: t_s + t_dual; step_grad = step + t_sfb",
}


@dataclass
class AttackSetting:
    """One attack of an experiment: its gradient source, iterations, EOT draws and images."""

    name: str
    gradient: str  # "bpda" | "full"
    iters: int
    eot: int
    images: int


@dataclass
class ExperimentSetting:
    """What the projection needs from one experiment config."""

    name: str
    steps: int = 10  # defense.steps (T)
    replicas: int = 10  # defense.replicas (S)
    worst_of_n: int = 10  # benchmark.worst_of_n (N)
    attacks: list[AttackSetting] = field(default_factory=list)
    # certify (cifar10_certify only)
    certify_sigmas: list[float] = field(default_factory=list)
    certify_bases: list[str] = field(default_factory=list)
    n0: int = 0
    n: int = 0
    certify_images: int = 0


SETTINGS = {
    "cifar10_croce2022": ExperimentSetting(
        "cifar10_croce2022",
        attacks=[
            AttackSetting("apgd10_eot200_cw", "full", 10, 200, 1000),
            AttackSetting("bpda40_eot15", "bpda", 40, 15, 1000),
        ],
    ),
    # the row: BPDA40+EOT15 on the 10k test images (the experiment runs more attacks)
    "cifar10_paper": ExperimentSetting(
        "cifar10_paper", attacks=[AttackSetting("bpda40_eot15", "bpda", 40, 15, 10000)]
    ),
    "cifar10_certify": ExperimentSetting(
        "cifar10_certify",
        certify_sigmas=[0.25, 0.5, 1.0],
        certify_bases=["noisy", "denoised", "adp"],
        n0=100,
        n=100000,
        certify_images=500,
    ),
}


def settings_from_config(name: str, attacks: list[str] | None = None) -> ExperimentSetting:
    """The same settings read from experiments/<name>.yaml (needs omegaconf; for the test)."""
    from advpure.config.compose import load

    cfg = load(name)
    s = ExperimentSetting(
        name, steps=cfg.defense.steps, replicas=cfg.defense.replicas, worst_of_n=cfg.benchmark.worst_of_n
    )
    for a in attacks if attacks is not None else list(cfg.attacks):
        node = cfg.attacks[a]
        s.attacks.append(
            AttackSetting(
                a, node.gradient, node.iters, node.eot, node.get("max_images") or cfg.benchmark.n_images
            )
        )
    if "certify" in name:
        c = cfg.certify
        s.certify_sigmas, s.certify_bases = list(c.sigmas), list(c.bases)
        s.n0, s.n, s.certify_images = c.n0, c.n, c.n_images
    return s


def step_times(t: dict[str, float], dtype: str) -> tuple[float, float]:
    """(step, step_grad) per row from the per-row times `t` of `dtype` (see the module docstring)."""
    step = 2 * t["t_s"] if dtype == "fp32" else t["t_s"] + t["t_dual"]
    return step, step + t["t_sfb"]


def attack_seconds_per_image(
    a: AttackSetting, s: ExperimentSetting, t: dict[str, float], dtype: str
) -> float:
    """Seconds per image of attack `a` (+ the N defended predictions) by the module's formulas."""
    step, step_grad = step_times(t, dtype)
    per_eval = s.steps * (step_grad if a.gradient == "full" else step) + t["t_cfb"]
    return (a.iters + 1) * a.eot * per_eval + s.worst_of_n * s.replicas * (s.steps * step + t["t_c"])


def certify_seconds_per_image(s: ExperimentSetting, t: dict[str, float], dtype: str) -> float:
    """Seconds per image of CERTIFY over every sigma and base."""
    step, _ = step_times(t, dtype)
    cost = {"noisy": t["t_c"], "denoised": t["t_s"] + t["t_c"], "adp": s.steps * step + t["t_c"]}
    return len(s.certify_sigmas) * (s.n0 + s.n) * sum(cost[b] for b in s.certify_bases)


def project(times: dict[str, dict[str, float]]) -> dict[str, dict]:
    """GPU-hours of every experiment of SETTINGS for each dtype of `times` ({dtype: per-row times})."""
    out = {}
    for name, s in SETTINGS.items():
        rec: dict = {"settings": asdict(s), "formula": FORMULA, "gpu_hours": {}, "per_attack_hours": {}}
        for dtype, t in times.items():
            total, parts = 0.0, {}
            for a in s.attacks:
                h = a.images * attack_seconds_per_image(a, s, t, dtype) / 3600
                parts[a.name], total = h, total + h
            if s.certify_bases:
                h = s.certify_images * certify_seconds_per_image(s, t, dtype) / 3600
                parts["certify"], total = h, total + h
            rec["gpu_hours"][dtype], rec["per_attack_hours"][dtype] = total, parts
        out[name] = rec
    return out


__all__ = [
    "FORMULA",
    "SETTINGS",
    "AttackSetting",
    "ExperimentSetting",
    "attack_seconds_per_image",
    "certify_seconds_per_image",
    "project",
    "settings_from_config",
    "step_times",
]
