"""Building the nets of an experiment, and loading them from exported weights in one call.

    >>> from advpure import config, nets
    >>> cfg = config.load("fmnist")
    >>> spec, classifier, score_net = nets.load_nets(cfg)          # eval mode, no grad on weights
    >>> net = nets.load_net("artifacts/fmnist/classifier.pt")      # any weights file, arch from the file

An exported weights file stores the architecture fields (`arch`) next to the tensors, so a net can
be rebuilt from the file alone; `load_nets` additionally checks the file against the config.
"""

from __future__ import annotations

from torch import nn

from advpure.core.errors import CheckpointError
from advpure.nets.classifiers import build_classifier
from advpure.nets.ncsnv2 import build_score_net
from advpure.nets.weights import load_weights, read_weights


def classifier_arch(cfg, spec) -> dict:
    """The fields that define the classifier's weights (stored in the exported file)."""
    return {
        "arch": cfg.classifier.arch,
        "in_channels": spec.channels,
        "image_size": spec.image_size,
        "num_classes": spec.num_classes,
    }


def make_classifier(arch: dict, spec=None, dropout: float = 0.0) -> nn.Module:
    """A classifier (images in [0, 1] -> logits) of architecture `arch`. `spec` (a DatasetSpec)
    gives the input normalization; without it a placeholder is used that loading weights replaces
    (the normalization's mean/std are buffers saved with the weights)."""
    c = arch["in_channels"]
    return build_classifier(
        arch["arch"],
        in_channels=c,
        image_size=arch["image_size"],
        num_classes=arch["num_classes"],
        mean=spec.mean if spec is not None else (0.0,) * c,
        std=spec.std if spec is not None else (1.0,) * c,
        dropout=dropout,
    )


def score_arch(cfg, spec) -> dict:
    """The fields that define the score net's weights (stored in the exported file)."""
    return {
        "arch": cfg.score.arch,
        "ngf": cfg.score.ngf,
        "in_channels": spec.channels,
        "image_size": spec.image_size,
    }


def make_score_net(arch: dict) -> nn.Module:
    """The score network f_theta of architecture `arch` (images in [0, 1] -> f of the same shape)."""
    return build_score_net(
        arch["arch"], in_channels=arch["in_channels"], image_size=arch["image_size"], ngf=arch["ngf"]
    )


BUILDERS = {"classifier": make_classifier, "score": make_score_net}


def frozen(net: nn.Module) -> nn.Module:
    """Eval mode and no gradients for the weights (attacks take gradients w.r.t. inputs only)."""
    return net.eval().requires_grad_(False)


def load_net_with_meta(path, kind: str | None = None) -> tuple[nn.Module, dict, dict]:
    """(net, arch, meta) from an advpure weights file: the net rebuilt from the architecture the
    file stores, its weights loaded, eval mode, weights frozen (a classifier's normalization
    constants are buffers of its weights). Raises CheckpointError for a bad file or when `kind`
    is given and the file holds another kind."""
    payload = read_weights(path)
    stored = payload["kind"]
    if kind is not None and stored != kind:
        raise CheckpointError(f"{path} holds a {stored} network, expected a {kind} network")
    if stored not in BUILDERS:
        raise CheckpointError(f"{path} holds a '{stored}' network; known: {', '.join(BUILDERS)}")
    arch = dict(payload["arch"])
    net = BUILDERS[stored](arch)
    meta = load_weights(path, stored, arch, net)
    return frozen(net), arch, meta


def load_net(path, kind: str | None = None) -> nn.Module:
    """The net stored in an advpure weights file (see `load_net_with_meta`)."""
    return load_net_with_meta(path, kind)[0]


def load_nets(cfg, score: bool = True):
    """(dataset spec, classifier, score net or None) of an experiment's config, from its
    exported weights (`classifier.weights`, or the RobustBench file when `classifier.source` is
    robustbench; `score.weights`), checked against the config's architecture; eval mode, weights
    frozen. Raises CheckpointError for missing/mismatched files."""
    from advpure.data import get_spec

    spec = get_spec(cfg.data.name)
    if cfg.classifier.source == "robustbench":
        from advpure.importers.robustbench import load_robustbench_classifier

        c = cfg.classifier
        classifier = load_robustbench_classifier(
            c.robustbench_name, cfg.data.name, c.threat_model, cfg.paths.models
        )
    else:
        arch = classifier_arch(cfg, spec)
        classifier = make_classifier(arch, spec)
        load_weights(cfg.classifier.weights, "classifier", arch, classifier)
    score_net = None
    if score:
        sarch = score_arch(cfg, spec)
        score_net = make_score_net(sarch)
        load_weights(cfg.score.weights, "score", sarch, score_net)
    return spec, frozen(classifier), frozen(score_net) if score_net is not None else None


def load_defense(experiment: str = "fmnist", overrides=(), *, amp_dtype=None):
    """The configured `Defense` of an experiment, from its exported weights, in one call:

        >>> defense = load_defense("fmnist", ["defense.sigma=0.1"])
        >>> probs = defense(x, SampleRNG(seed=0, index=range(len(x))))

    Raises ConfigError / CheckpointError like the CLI does."""
    from advpure import config
    from advpure.purify import build_defense, purifier_class

    cfg = config.load(experiment, list(overrides))
    spec, classifier, score_net = load_nets(cfg, score=purifier_class(cfg.defense.kind).needs_score)
    return build_defense(
        cfg.defense,
        classifier,
        {"score": score_net},
        channels=spec.channels,
        image_size=spec.image_size,
        amp_dtype=amp_dtype,
    )
