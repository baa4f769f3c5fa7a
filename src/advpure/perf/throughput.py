"""Throughput [throughput.*]: the classifier training step, defended inference, and each attack of
the fmnist experiment (a few iterations, extrapolated to the full attack). The DSM training
step's throughput is measured with P4 (`p4_dsm`).
"""

from __future__ import annotations

import dataclasses

import torch

from advpure.attacks import run_attack
from advpure.config.compose import attack_eps_step
from advpure.config.compose import load as load_config
from advpure.core.rng import SampleRNG
from advpure.perf.harness import Ctx, adp_defense, fmnist_attacks, grng, images, make_nets, section
from advpure.perf.peak import count_flops
from advpure.perf.report import fmt
from advpure.perf.timing import interleaved, med


@section("train", order=50)
def classifier_train(ctx: Ctx) -> None:
    """`ClassifierModule.training_step` + backward + Adam, small_cnn 28x28, batch `data.batch_size`."""
    from omegaconf import OmegaConf

    from advpure.data import SPECS
    from advpure.training.classifier import ClassifierModule, build_optimizer

    dev, rep = ctx.device, ctx.report
    torch.manual_seed(0)
    spec = SPECS["fmnist"]
    arch = {"arch": "small_cnn", "in_channels": 1, "image_size": 28, "num_classes": 10}
    optim = {
        "name": "adam",
        "lr": 1e-3,
        "weight_decay": 0.0,
        "betas": [0.9, 0.999],
        "momentum": 0.9,
        "nesterov": False,
    }
    module = ClassifierModule(arch, spec, optim).to(dev).train()
    opt = build_optimizer(module.parameters(), OmegaConf.create(optim))
    b = 8 if ctx.tiny else ctx.exp.clf_batch
    x = torch.rand(b, 1, 28, 28, device=dev)
    y = torch.randint(0, 10, (b,), device=dev)
    idx = torch.arange(b, device=dev)

    def step():
        loss = module.training_step((x, y, idx), 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    fl: dict[str, int] = {}
    times, _ = interleaved({"step": step}, dev, ctx.repeats, flops=fl)
    rep.add(
        "throughput.classifier_train_images_per_s",
        b / med(times["step"]),
        "images/s",
        note=f"small_cnn 28x28, batch {b}",
        rate=ctx.rate(fl["step"], med(times["step"])),
    )


@section("inference", order=60)
def defended_inference(ctx: Ctx) -> None:
    """`Defense.forward` (ADP, S replicas, T steps, tau = 0) on B images."""
    dev, rep, sz = ctx.device, ctx.report, ctx.sz
    score, clf = make_nets(sz, dev)
    x, _ = images(sz.batch, sz, dev)
    defense = adp_defense(score, clf, ctx.exp, steps=sz.steps, replicas=sz.replicas, tau=0.0)

    def fwd():
        with torch.no_grad():
            return defense(x, grng(3, dev))

    fl: dict[str, int] = {}
    times, _ = interleaved({"fwd": fwd}, dev, ctx.repeats, flops=fl)
    conv = (score, images(sz.replicas * sz.batch, sz, dev)[0], f"ncsnv2-{sz.image_size}-ngf{sz.ngf}")
    rep.add(
        "throughput.defended_inference_images_per_s",
        sz.batch / med(times["fwd"]),
        "images/s",
        note=f"Defense.forward S={sz.replicas} T={sz.steps} tau=0, B={sz.batch}",
        rate=ctx.rate(fl["fwd"], med(times["fwd"]), conv=conv),
    )


@section("attacks", order=70)
def attack_throughput(ctx: Ctx) -> None:
    """Each attack of the fmnist experiment on one batch with a few iterations (SPSA also with
    fewer directions), extrapolated linearly to the full attack: a run of n iterations makes
    n + 1 objective evaluations, the full one iters + 1 (SPSA: x (2N+1)/(2n+1) in directions)."""
    dev, rep, sz = ctx.device, ctx.report, ctx.sz
    cfg = load_config("fmnist")
    score, clf = make_nets(sz, dev)
    d = cfg.defense
    defense = adp_defense(score, clf, ctx.exp, steps=sz.steps, replicas=sz.replicas, tau=0.0)
    b, n = sz.attack_batch, sz.attack_iters
    x, y = images(b, sz, dev)
    print(
        f"  [throughput] fmnist attacks on B={b} image(s), {n} iteration(s), S={sz.replicas}, T={sz.steps} "
        f"(experiment: S={d.replicas}, T={d.steps}), tau=0; extrapolated to the full attack",
        flush=True,
    )
    for name, node, spec in fmnist_attacks(cfg):
        scale = (spec.iters + 1) / (n + 1)
        small = dataclasses.replace(spec, iters=n)
        if spec.kind == "spsa":
            m = min(spec.samples, sz.spsa_samples)
            small = dataclasses.replace(small, samples=m)
            scale *= (2 * spec.samples + 1) / (2 * m + 1)
        eps, step = attack_eps_step(cfg, node)

        def run(small=small, name=name, eps=eps, step=step):
            return run_attack(
                small, defense, x, y, SampleRNG(0, list(range(b)), stream=name), eps=eps, step=step
            )

        fl: dict[str, int] = {}  # counted on a separate call (the timed runs have no warm-up)
        fl["run"] = count_flops(run)[0]
        times, _ = interleaved({"run": run}, dev, ctx.slow_repeats, warmup={})
        per_image = med(times["run"]) / b * scale
        rep.add(
            f"throughput.attack.{name}.images_per_s",
            1.0 / per_image,
            "images/s (extrap.)",
            note=f"{fmt(per_image)} s/image for {spec.iters} iters, eot {getattr(spec, 'eot', 1)}",
            rate=ctx.rate(fl["run"], med(times["run"])),
        )
