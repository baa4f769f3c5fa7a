"""What the three diffusion network kinds (`advpure.kinds.ddpmpp`, `.ddpm`, `.adm`) share: the "eps"
signature (``net(u, t)`` -> eps for u in [-1, 1], t in [0, 1], ``net.schedule``, ``net.score``; see
`advpure.nets.diffusion`), an arch dict ``{"family": ..., **constructor arguments}`` (lists for tuples)
built by `advpure.nets.families.build_diffusion_net`, the `import-weights` subcommand wrapping an
importer function of `advpure.importers.{score_sde,ddpm,adm}`, and the training stage (`train_eps_kind`,
`advpure.training.diffusion.DiffusionModule`).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from advpure.core.errors import ConfigError
from advpure.kinds.fitting import fit_validated
from advpure.nets.families import build_diffusion_net
from advpure.nets.registry import Importer, NetKind

__all__ = ["DiffusionImport", "EpsKind", "plain_arch", "check_levels", "train_eps_kind", "TRAIN_RESUME_FREE"]

# a run may be extended (max_steps) or validated / checkpointed differently when resumed
TRAIN_RESUME_FREE = (
    "max_steps",
    "ckpt_every_n_steps",
    "val_every_n_steps",
    "val_batches",
    "val_t_star",
    "t_buckets",
    "weights",
)


def plain_arch(arch: Mapping[str, Any]) -> dict[str, Any]:
    """The arch dict as stored in weights files: tuples as lists, so that a file's arch and the one a
    config block gives compare equal (`advpure.nets.weights.load_weights`)."""
    return {k: list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v for k, v in arch.items()}


def check_levels(kind: str, image_size: int, levels: int) -> None:
    """ConfigError unless `image_size` can be halved `levels - 1` times (the U-Nets' skip connections)."""
    if image_size % 2 ** (levels - 1):
        raise ConfigError(
            f"{kind}: {levels} resolution levels need an image size divisible by {2 ** (levels - 1)}, "
            f"got {image_size}; use {kind}={kind}_28 for 28x28 data"
        )


def _positive_ints(kind: str, key: str, values, *, allow_empty: bool = False) -> None:
    values = list(values)
    if (not values and not allow_empty) or any(not isinstance(v, int) or v < 1 for v in values):
        raise ConfigError(f"{kind}.{key}: must be a list of positive integers, got {values}")


class EpsKind(NetKind):
    """Base of the diffusion kinds (not registered itself)."""

    signature = "eps"
    resume_free = TRAIN_RESUME_FREE

    @classmethod
    def build(cls, arch):
        return build_diffusion_net(arch)

    @classmethod
    def check_lists(cls, block, keys: tuple[str, ...], empty_ok: tuple[str, ...] = ()) -> None:
        for key in keys:
            _positive_ints(cls.name, key, block[key], allow_empty=key in empty_ok)


class DiffusionImport(Importer):
    """`advpure import-weights <source> CHECKPOINT OUT [--config NAME] [--no-ema]`: read a published file
    with `read` (an importer function returning (float32 state dict, meta with ``arch``)), load it into the
    net of that arch and write an advpure weights file of network kind `kind`."""

    kind: str = ""
    read: Callable[..., tuple[dict, dict]]
    configs: Mapping[str, dict] = {}  # --config choices (the net presets of advpure.nets.<family>)
    default_config: str = ""
    has_ema: bool = False  # the file holds raw and EMA weights (--no-ema takes the raw ones)
    option_hint: str = ""  # the config option that loads the default configuration's file

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("checkpoint", help="the published file (read with torch.load(weights_only=True))")
        parser.add_argument(
            "out", help=f"the advpure weights file to write (e.g. artifacts/<dataset>/{cls.kind}.pt)"
        )
        parser.add_argument(
            "--config",
            choices=list(cls.configs),
            default=cls.default_config,
            help=f"the architecture the file holds (default {cls.default_config}, the published model)",
        )
        if cls.has_ema:
            parser.add_argument(
                "--no-ema", action="store_true", help="take the raw training weights instead of the EMA copy"
            )

    @classmethod
    def read_file(cls, args: argparse.Namespace) -> tuple[dict, dict]:
        if cls.has_ema:
            return cls.read(args.checkpoint, config=args.config, ema=not args.no_ema)
        return cls.read(args.checkpoint, config=args.config)

    @classmethod
    def run(cls, args: argparse.Namespace) -> str:
        from advpure.nets.weights import check_weights_output, save_weights

        check_weights_output(args.out, force=args.force, force_hint="--force", inputs=[args.checkpoint])
        state, meta = cls.read_file(args)
        arch = plain_arch(meta.pop("arch"))
        with torch.device("meta"):  # no second copy of the weights (ADM: 2.2 GB)
            net = build_diffusion_net(arch)
        net.load_state_dict(state, assign=True)
        out = save_weights(
            args.out,
            cls.kind,
            arch,
            net,
            meta,
            force=args.force,
            force_hint="--force",
            inputs=[args.checkpoint],
        )
        step = meta.get("step", -1)
        return (
            f"import-weights: {out} <- {meta['source_file']} (weights: {meta['weights']}"
            + (f", step {step}" if step is not None and step >= 0 else "")
            + f", {meta['parameters']:,} parameters, sha256 {meta['source_sha256'][:12]}...)"
        )


def train_eps_kind(kind: type[NetKind], block, ctx) -> dict:
    """The training stage of a diffusion kind: continuous-time DSM for block.max_steps steps
    (`DiffusionModule`); exports the EMA weights with the schedule, the recipe, the step count and the
    validation metrics in meta. Returns the meta."""
    from advpure.training.diffusion import DiffusionModule

    t0 = time.perf_counter()
    dm = ctx.datamodule(batch_size=block.batch_size, crop_padding=0, hflip=block.hflip)
    # validation uses the first val_batches batches of the split, whatever the number of ranks
    dm.val_n = block.val_batches * ctx.data.eval_batch_size
    arch = kind.arch(block, dm.spec)
    module = DiffusionModule.from_block(arch, block, seed=ctx.seed, log_images=ctx.log_images)
    n_params = sum(p.numel() for p in module.net.parameters())
    ctx.say(
        f"training {kind.label} ({n_params:,} parameters) by continuous-time DSM for {block.max_steps} steps "
        f"(batch {block.batch_size})"
    )
    trainer, metrics = fit_validated(ctx, module, dm, block)
    net = module.ema.shadow
    meta = {
        "steps": int(trainer.global_step),
        "seconds": time.perf_counter() - t0,
        "dataset": ctx.data.name,
        "weights": "ema",
        "schedule": net.schedule.describe(),
        "objective": "continuous-time DSM, eps-prediction, reduce_mean (Song et al. 2021 Eq. 7, lambda = 1 - abar)",
        "t_eps": float(block.t_eps),
        "batch_size": int(block.batch_size),
        "lr": float(block.lr),
        "warmup": int(block.warmup),
        "grad_clip": float(block.grad_clip) if block.grad_clip is not None else -1.0,
        "ema_decay": float(block.ema_decay),
        "ema_warmup": bool(block.ema_warmup),
        "ema_updates": int(module.ema.updates),
        "parameters": int(n_params),
        **metrics,
    }
    ctx.export(arch, net, meta)
    key = f"val/psnr_gain_t{block.val_t_star:g}"
    gain = metrics.get(key)
    ctx.say(
        f"{trainer.global_step} steps in {meta['seconds']:.0f} s; one-step denoising PSNR gain at t* = "
        f"{block.val_t_star:g}: " + (f"{gain:+.2f} dB" if gain is not None else "n/a (no validation ran)")
    )
    return meta
