"""The classifier g_phi every defense protects: images in [0, 1] -> logits, input normalization inside.

Trained by cross-entropy (`advpure.training.classifier.ClassifierModule`; Gaussian-noise augmentation
at `noise_sd` for randomized smoothing's baseline, Cohen et al. 2019), or read from RobustBench's
model zoo (`source: robustbench`; Croce et al. 2021), which advpure does not train.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advpure.core.params import at_least, between, choice, schema
from advpure.nets.classifiers import CLASSIFIER_ARCHS, make_classifier
from advpure.nets.registry import NetKind, register_net_kind
from advpure.training.optim import OPTIMIZERS, SCHEDULES


@schema
@dataclass
class OptimConfig:
    name: str = choice("sgd", *OPTIMIZERS)
    lr: float = at_least(0.1, 0.0, strict=True)
    momentum: float = between(0.9, 0.0, 1.0)
    nesterov: bool = False
    weight_decay: float = at_least(5e-4, 0.0)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: str = choice("cosine", *SCHEDULES)
    milestones: list[float] = field(default_factory=lambda: [0.3, 0.6, 0.8])  # fractions of training
    gamma: float = between(0.2, 0.0, 1.0)
    grad_clip: float | None = None


@schema
@dataclass
class ClassifierConfig:
    arch: str = choice("small_cnn", *CLASSIFIER_ARCHS)
    dropout: float = between(0.0, 0.0, 1.0)
    optim: OptimConfig = field(default_factory=OptimConfig)
    label_smoothing: float = between(0.0, 0.0, 1.0)
    # Gaussian-noise augmentation of training batches, std in [0, 1] image units (0 = off): train at
    # the smoothing sigma to make randomized smoothing's bare-classifier baseline fair (Cohen et al. 2019)
    noise_sd: float = at_least(0.0, 0.0)
    weights: str = "${paths.artifacts}/${data.name}/classifier.pt"
    # where the classifier comes from: trained by advpure (`weights`), or a RobustBench model-zoo
    # file (Croce et al. 2021) read offline from paths.models (arch is then the zoo entry's)
    source: str = choice("advpure", "advpure", "robustbench")
    robustbench_name: str = "Standard"
    threat_model: str = choice("Linf", "Linf", "L2", "corruptions")


@register_net_kind("classifier")
class Classifier(NetKind):
    """The protected classifier (small CNN, WRN-28-10, ResNet-18), or a RobustBench zoo model."""

    Config = ClassifierConfig
    signature = "classifier"
    label = "classifier"
    resume_free = ("weights", "source", "robustbench_name", "threat_model")

    @classmethod
    def arch(cls, block, spec) -> dict:
        return {
            "arch": block.arch,
            "in_channels": spec.channels,
            "image_size": spec.image_size,
            "num_classes": spec.num_classes,
        }

    @classmethod
    def build(cls, arch) -> Any:
        return make_classifier(dict(arch))

    @classmethod
    def weights_path(cls, block, paths, data_name: str) -> Path:
        if block.source == "robustbench":
            from advpure.importers.robustbench import robustbench_path

            return robustbench_path(block.robustbench_name, data_name, block.threat_model, paths.models)
        return Path(block.weights)

    @classmethod
    def load(cls, block, path: Path, spec) -> tuple[Any, dict]:
        if block.source == "robustbench":
            from advpure.importers.robustbench import load_robustbench_classifier

            models = Path(path).parents[2]  # <models>/<dataset>/<threat_model>/<name>.pt
            net = load_robustbench_classifier(block.robustbench_name, spec.name, block.threat_model, models)
            return net.requires_grad_(False), {"source": "robustbench", "name": block.robustbench_name}
        from advpure.nets.weights import load_weights

        arch = cls.arch(block, spec)
        net = make_classifier(arch, spec)
        meta = load_weights(path, cls.name, arch, net)
        return net.eval().requires_grad_(False), meta

    @classmethod
    def how_to_get(cls, block, path: Path, data_name: str, experiment: str) -> str:
        if block.source == "robustbench":
            from advpure.importers.robustbench import MODELS

            entry = MODELS.get((data_name, block.threat_model, block.robustbench_name))
            if entry is None:
                return f"{path}: the RobustBench '{block.robustbench_name}' model, from the RobustBench model zoo"
            return f"{path}: the RobustBench '{block.robustbench_name}' model: {entry.fetch(path)}"
        return super().how_to_get(block, path, data_name, experiment)

    @classmethod
    def stage_inputs(cls, block, ctx) -> dict:
        return {**super().stage_inputs(block, ctx), "batch": ctx.data.batch_size, "epochs": ctx.max_epochs}

    @classmethod
    def train(cls, block, ctx) -> dict:
        """Cross-entropy for ctx.max_epochs epochs on [0, 1] images (Gaussian noise at noise_sd when
        > 0); exports the weights with meta test_acc (in [0, 1]), seconds, images_per_s, noise_sd."""
        import time

        from advpure.core.errors import ConfigError
        from advpure.training.classifier import ClassifierModule

        if block.source == "robustbench":
            raise ConfigError(
                "classifier.source=robustbench: the classifier comes from the RobustBench model zoo and is not "
                f"trained here; put its file at {ctx.weights} (or train.stages=[score])"
            )
        t0 = time.perf_counter()
        dm = ctx.datamodule()
        arch = cls.arch(block, dm.spec)
        module = ClassifierModule.from_block(arch, dm.spec, block)
        ctx.say(f"training {arch['arch']} on {ctx.data.name} for {ctx.max_epochs} epochs")
        trainer = ctx.fit(module, dm, epochs=ctx.max_epochs, gradient_clip_val=block.optim.grad_clip)
        test = trainer.test(module, datamodule=dm, verbose=False)
        acc = float(test[0]["test/acc"]) if test else float("nan")
        meta = {
            "test_acc": acc,
            "epochs": int(trainer.current_epoch),
            "seconds": time.perf_counter() - t0,
            "dataset": ctx.data.name,
            "images_per_s": float(getattr(module, "images_per_s", float("nan"))),
            "noise_sd": float(block.noise_sd),  # Gaussian training noise (randomized smoothing)
        }
        ctx.export(arch, module.net, meta)
        ctx.say(
            f"test accuracy {100 * acc:.2f}% after {meta['seconds']:.0f} s "
            f"({meta['images_per_s']:.0f} training images/s)"
        )
        return meta


__all__ = ["Classifier", "ClassifierConfig", "OptimConfig"]
