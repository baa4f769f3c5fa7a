"""P4, DSM training-step overhead [P4.*]: one `ScoreModule` training step as Lightning runs it
(noise sampling, the DSM loss of Song & Ermon 2019, backward, Adam, EMA) over a bare forward +
backward + Adam step of the same net and batch; also [throughput.dsm_train_images_per_s].
"""

from __future__ import annotations

import copy

import torch

from advpure.perf.harness import Ctx, images, section
from advpure.perf.timing import interleaved, med, paired_ratio


@section("P4", order=40)
def p4_dsm(ctx: Ctx) -> None:
    """The full DSM step / the bare step, paired; checks one EMA update per step."""
    from advpure.training.score import ScoreModule

    dev, rep, sz = ctx.device, ctx.report, ctx.sz
    torch.manual_seed(0)
    arch = {"arch": "ncsnv2", "ngf": sz.ngf, "in_channels": sz.channels, "image_size": sz.image_size}
    e = ctx.exp
    module = ScoreModule(
        arch,
        dsm_sigma_max=e.dsm_sigma_max,
        dsm_sigma_min=e.dsm_sigma_min,
        dsm_levels=e.dsm_levels,
        lr=e.score_lr,
        ema_decay=e.ema_decay,
    ).to(dev)
    module.train()
    opt = module.configure_optimizers()
    bare_net = copy.deepcopy(module.net).train()
    bare_opt = torch.optim.Adam(bare_net.parameters(), lr=e.score_lr)
    x, _ = images(sz.train_batch, sz, dev)
    batch = (x,)

    def full_step():
        # what Lightning's automatic optimisation runs for one batch: optimizer_step(closure) with
        # closure = training_step + zero_grad + backward, then on_train_batch_end. The EMA update
        # lives in one of those hooks (optimizer_step or on_train_batch_end, depending on the version
        # of ScoreModule); calling both hooks as Lightning does covers either.
        out = {}

        def closure():
            out["loss"] = loss = module.training_step(batch, 0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            return loss

        module.optimizer_step(0, 0, opt, closure)
        module.on_train_batch_end(out["loss"], batch, 0)

    def bare_step():
        loss = bare_net(x).square().mean()
        bare_opt.zero_grad(set_to_none=True)
        loss.backward()
        bare_opt.step()

    u0 = int(module.ema.updates)
    fl: dict[str, int] = {}
    times, _ = interleaved({"full": full_step, "bare": bare_step}, dev, ctx.repeats, flops=fl)
    steps_run = ctx.repeats + 1  # + the warm-up
    conv = (module.net, x, f"ncsnv2-{sz.image_size}-ngf{sz.ngf}-train")
    r_full = ctx.rate(fl["full"], med(times["full"]), conv=conv)
    rep.check(
        "P4.ema_updated_every_step",
        int(module.ema.updates) - u0 == steps_run,
        ema_updates=int(module.ema.updates) - u0,
        steps=steps_run,
    )
    met = rep.add(
        "P4.overhead",
        paired_ratio(times["full"], times["bare"]),
        "ratio",
        ("<=", 1.10),
        note=f"batch {sz.train_batch}, ngf={sz.ngf}",
        rate=r_full,
    )
    rep.add("P4.dsm_images_per_s", sz.train_batch / med(times["full"]), "images/s", rate=r_full)
    rep.add("throughput.dsm_train_images_per_s", sz.train_batch / med(times["full"]), "images/s", rate=r_full)
    if met is False and ctx.profile:
        rep.profile("P4.bare_step", bare_step, dev, "overhead goal missed; the bare step")
        rep.profile("P4.full_step", full_step, dev, "the full DSM step", versus="P4.bare_step")
