"""The NCSNv2 score network f_theta (Song & Ermon, NeurIPS 2020), trained by denoising score matching
so that f(x + sigma eps) ~ -eps, i.e. f ~ sigma grad log p_sigma: the time-free field ADP follows
(Yoon, Hwang & Lee, ICML 2021), Langevin runs on (divided by sigma) and reverse-VE diffuses with.

Stage `score` (`advpure.training.score.ScoreModule`); importer `advpure import-weights ncsnv2` for
the published CIFAR-10 checkpoint (`advpure.importers.ncsnv2`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from advpure.core.params import at_least, between, choice, schema
from advpure.kinds.fitting import fit_validated
from advpure.nets.ncsnv2 import SCORE_ARCHS, make_score_net
from advpure.nets.registry import Importer, NetKind, register_net_kind

NCSNV2_CIFAR10_URL = "https://drive.google.com/drive/folders/1217uhIvLg9ZrYNKOR3XTRFSurt4miQrd"


@schema
@dataclass
class ScoreConfig:
    arch: str = choice("ncsnv2", *SCORE_ARCHS)
    ngf: int = at_least(128, 1)  # base channels: 128 = the paper's CIFAR-10 net
    # DSM noise levels (Song & Ermon 2020): L geometric levels dsm_sigma_max -> dsm_sigma_min
    dsm_sigma_max: float = at_least(50.0, 0.0, strict=True)
    dsm_sigma_min: float = at_least(0.01, 0.0, strict=True)
    dsm_levels: int = at_least(232, 1)
    dsm_sigma_fixed: float | None = at_least(None, 0.0, strict=True)  # train at one level instead
    batch_size: int = at_least(128, 1)
    lr: float = at_least(1e-4, 0.0, strict=True)
    beta1: float = between(0.9, 0.0, 1.0)
    weight_decay: float = at_least(0.0, 0.0)
    grad_clip: float | None = None
    ema_decay: float = between(0.999, 0.0, 1.0)
    max_steps: int = at_least(300_000, 1)
    ckpt_every_n_steps: int = at_least(5000, 1)
    val_every_n_steps: int = at_least(5000, 1)
    val_batches: int = at_least(4, 1)  # batches of the validation split used for val metrics
    hflip: bool = False
    weights: str = "${paths.artifacts}/${data.name}/score.pt"


class NCSNv2Import(Importer):
    help = "the NCSNv2 checkpoint of ermongroup/ncsnv2 (Song & Ermon 2020) -> score weights"
    description = (
        "Convert the reference NCSNv2 checkpoint (the list [state_dict, optimizer, epoch, step, ema_shadow] "
        "saved by ermongroup/ncsnv2) into an advpure score weights file for score=ncsnv2_cifar10. The net's "
        "raw output f is used (ADP), not f / sigma."
    )
    example = "advpure import-weights ncsnv2 checkpoint.pth artifacts/cifar10/score.pt"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("checkpoint", help="the .pth file (read with torch.load(weights_only=True))")
        parser.add_argument("out", help="the advpure weights file to write (e.g. artifacts/cifar10/score.pt)")
        parser.add_argument(
            "--ema", action="store_true", help="take the EMA shadow (list element 4) instead of element 0"
        )
        parser.add_argument(
            "--any-sigmas",
            action="store_true",
            help="import even if the checkpoint's sigmas are not the CIFAR-10 schedule (232 levels 50 -> 0.01)",
        )

    @classmethod
    def run(cls, args: argparse.Namespace) -> str:
        from advpure.importers.ncsnv2 import import_ncsnv2

        out, meta = import_ncsnv2(
            args.checkpoint, args.out, ema=args.ema, any_sigmas=args.any_sigmas, force=args.force
        )
        return (
            f"import-weights: {out} <- {meta['source_file']} ({meta['element']}, step {meta['step']}, "
            f"{meta['parameters']:,} parameters, sha256 {meta['source_sha256'][:12]}...)"
        )


@register_net_kind("score")
class NCSNv2Score(NetKind):
    """NCSNv2 score net f ~ sigma grad log p_sigma (a time-free field on [0, 1] images)."""

    Config = ScoreConfig
    signature = "field"
    field = "dsm"
    field_label = "DSM"
    label = "NCSNv2 score net (DSM)"
    importers = {"ncsnv2": NCSNv2Import}
    # a run may be extended (max_steps) or validated / checkpointed differently when resumed
    resume_free = ("max_steps", "ckpt_every_n_steps", "val_every_n_steps", "val_batches", "weights")

    @classmethod
    def check(cls, block) -> None:
        from advpure.core.errors import ConfigError

        if block.dsm_sigma_min > block.dsm_sigma_max:
            raise ConfigError(
                f"score.dsm_sigma_min ({block.dsm_sigma_min}) must be <= score.dsm_sigma_max ({block.dsm_sigma_max})"
            )

    @classmethod
    def arch(cls, block, spec) -> dict:
        return {
            "arch": block.arch,
            "ngf": block.ngf,
            "in_channels": spec.channels,
            "image_size": spec.image_size,
        }

    @classmethod
    def build(cls, arch):
        return make_score_net(dict(arch))

    @classmethod
    def prepare(cls, net, meta):
        """The DSM noise range from the weights' meta as attributes (`dsm_sigma_min`, `dsm_sigma_max`,
        `dsm_levels`): what a screening or smoothing sigma is checked against, and reverse-VE's grid."""
        for key in ("dsm_sigma_min", "dsm_sigma_max", "dsm_levels"):
            if meta.get(key) is not None:
                setattr(net, key, meta[key])
        return net

    @classmethod
    def how_to_get(cls, block, path, data_name: str, experiment: str) -> str:
        if data_name == "cifar10" and block.arch == "ncsnv2":
            return (
                f"{path}: import the public NCSNv2 CIFAR-10 checkpoint (Song & Ermon 2020, {NCSNV2_CIFAR10_URL}) "
                f"with `advpure import-weights ncsnv2 <checkpoint.pth> {path}`, or train it (`make train`)"
            )
        return super().how_to_get(block, path, data_name, experiment)

    @classmethod
    def train(cls, block, ctx) -> dict:
        """DSM for block.max_steps steps (`ScoreModule`); exports the EMA weights with the DSM noise
        levels (dsm_sigma_min/max, dsm_levels) and the validation metrics in meta."""
        import time

        from advpure.training.score import ScoreModule

        t0 = time.perf_counter()
        dm = ctx.datamodule(batch_size=block.batch_size, crop_padding=0, hflip=block.hflip)
        # validation uses the first val_batches batches of the split, whatever the number of ranks
        dm.val_n = block.val_batches * ctx.data.eval_batch_size
        arch = cls.arch(block, dm.spec)
        module = ScoreModule.from_block(arch, block, seed=ctx.seed, log_images=ctx.log_images)
        ctx.say(f"training NCSNv2 (ngf {block.ngf}) by DSM for {block.max_steps} steps")
        trainer, metrics = fit_validated(ctx, module, dm, block)
        meta = {
            "steps": int(trainer.global_step),
            "seconds": time.perf_counter() - t0,
            "dataset": ctx.data.name,
            # the DSM noise range: screening and smoothing sigmas are checked against it
            "dsm_sigma_min": float(module.sigmas.min()),
            "dsm_sigma_max": float(module.sigmas.max()),
            "dsm_levels": int(module.sigmas.numel()),
            **metrics,
        }
        ctx.export(arch, module.ema.shadow, meta)
        gain = metrics.get("val/psnr_gain_s0.25")
        ctx.say(
            f"{trainer.global_step} steps in {meta['seconds']:.0f} s; one-step denoising PSNR gain at sigma 0.25: "
            + (f"{gain:+.2f} dB" if gain is not None else "n/a")
        )
        return meta


__all__ = ["NCSNV2_CIFAR10_URL", "NCSNv2Import", "NCSNv2Score", "ScoreConfig"]
