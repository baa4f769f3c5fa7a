"""`advpure benchmark`: train what is missing, then attack the undefended and the defended
classifier and report natural and robust accuracy under every protocol.

Reads top to bottom:
  1. ensure_weights   exported classifier / score weights exist (or train them)
  2. build_suite      defenses x attacks (advpure.suite), validated before any work
  3. open_run_dir     resolved config + manifest; refuse a run dir made by other settings
  4. trainer.test     DefendedClassifier (natural accuracy) + one AttackCallback per unit,
                      per-sample records stored per process, resumable batch by batch
  5. ReportCallback   results.{json,csv,md}, plots, console table, W&B (rank 0)
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from advpure.attacks import check_attack
from advpure.callbacks.attack import AttackCallback
from advpure.callbacks.report import ReportCallback
from advpure.checkpoint import load_weights
from advpure.config import fingerprint, to_dict, to_yaml
from advpure.data import ImageDataModule, get_spec
from advpure.errors import CheckpointError, ConfigError, RunDirError
from advpure.lit.classifier import classifier_arch, make_classifier
from advpure.lit.defended import DefendedClassifier, metric_name
from advpure.lit.score import make_score_net, score_arch
from advpure.loggers import build_logger
from advpure.nets.compiled import compile_net
from advpure.purify.defense import build_defense
from advpure.results import NATURAL, PROTOCOLS, clear
from advpure.runenv import redirect_writes_for
from advpure.suite import Suite, build_suite, natural_fingerprint, unit_fingerprint
from advpure.train import say, train, weights_path
from advpure.trainer import build_trainer, launch_rank

AMP = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


# 1 ------------------------------------------------------------------------------------------------
def ensure_weights(cfg: DictConfig, suite: Suite) -> None:
    stages = ["classifier"] + (["score"] if suite.needs_score else [])
    missing = [s for s in stages if not weights_path(cfg, s).exists()]
    if not missing:
        return
    if not cfg.benchmark.train_missing:
        paths = ", ".join(str(weights_path(cfg, s)) for s in missing)
        raise CheckpointError(
            f"missing trained weights ({paths}) and benchmark.train_missing=false; run `make train`"
        )
    say(f"training what is missing: {', '.join(missing)}")
    train(cfg, stages=tuple(missing))


def load_nets(cfg: DictConfig, suite: Suite):
    spec = get_spec(cfg.data.name)
    arch = classifier_arch(cfg, spec)
    classifier = make_classifier(arch, spec)
    load_weights(cfg.classifier.weights, "classifier", arch, classifier)
    score = None
    if suite.needs_score:
        sarch = score_arch(cfg, spec)
        score = make_score_net(sarch)
        load_weights(cfg.score.weights, "score", sarch, score)
    return (
        spec,
        classifier.eval().requires_grad_(False),
        score.eval().requires_grad_(False) if score else None,
    )


def _file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# 3 ------------------------------------------------------------------------------------------------
def base_fingerprint(cfg: DictConfig, suite: Suite) -> str:
    bc = cfg.benchmark
    weights = {"classifier": _file_hash(cfg.classifier.weights)}
    if suite.needs_score:
        weights["score"] = _file_hash(cfg.score.weights)
    return fingerprint(
        {
            "data": cfg.data.name,
            "n_images": bc.n_images,
            "batch_size": bc.batch_size,
            "worst_of_n": bc.worst_of_n,
            "ever_broken": bc.ever_broken,
            "seed": cfg.seed,
            "weights": weights,
            "merge": cfg.defense.merge,
        }
    )


def open_run_dir(cfg: DictConfig, suite: Suite) -> Path:
    """Create or reopen the run dir. Refuses (changing nothing) when its records were made by other
    settings, unless benchmark.overwrite=true, which deletes them."""
    run_dir = Path(cfg.benchmark.run_dir)
    manifest_path = run_dir / "manifest.json"
    units = {f"{d}/{NATURAL}": natural_fingerprint(suite, d) for d in suite.defenses}
    units.update({u.key: unit_fingerprint(suite, u, cfg) for u in suite.units})
    manifest = {"base": base_fingerprint(cfg, suite), "units": units}
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
            old_base, old_units = old["base"], old["units"]
        except (ValueError, KeyError, TypeError):
            raise RunDirError(
                f"{manifest_path} is corrupt; delete the run dir or use benchmark.overwrite=true"
            ) from None
        changed = [k for k in units if k in old_units and old_units[k] != units[k]]
        if old_base != manifest["base"]:
            changed = [
                "the base settings (data, images, batch size, protocols, seed or trained weights)",
                *changed,
            ]
        if changed and not cfg.benchmark.overwrite:
            raise RunDirError(
                f"{run_dir} holds results made with other settings ({'; '.join(changed[:4])}); "
                "use benchmark.overwrite=true to discard them, or another benchmark.run_dir"
            )
        if changed or not cfg.benchmark.resume:
            if launch_rank() == 0:
                clear(run_dir)
            old_units = {}
        manifest["units"] = {**old_units, **units}
    # A SIGUSR1 under SLURM left an hpc checkpoint here; under SLURM Lightning's test() would load
    # it, but the nets come from the weights files and the records are what resumes. Every rank
    # deletes it before its own test() picks a checkpoint (rank 0 alone would race the others).
    for stale in run_dir.glob("hpc_ckpt_*.ckpt"):
        stale.unlink(missing_ok=True)
    if launch_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return run_dir


def header_lines(cfg: DictConfig, suite: Suite) -> list[str]:
    bc, d = cfg.benchmark, cfg.defense
    eps = sorted({u.eps for u in suite.units if not u.sweep})
    lines = [
        f"{cfg.data.name}: first {bc.n_images} test images; l_inf eps {', '.join(f'{e:.4g}' for e in eps)} "
        f"(step {cfg.data.step:.4g}); experiment `{cfg.experiment}`",
        f"classifier {cfg.classifier.arch}; ADP: T={d.steps}, S={d.replicas} replicas merged by {d.merge}, "
        f"lambda={d.lam}, delta={d.delta}, tau={d.tau}, {d.noise} screening",
        f"protocols: single draw, worst of N={bc.worst_of_n}, "
        + ("ever broken (defense checked at every iterate)" if bc.ever_broken else "ever broken not tracked"),
    ]
    if cfg.data.name != "cifar10" or bc.n_images < 10000:
        lines.append(
            "smaller than the seed's protocol (CIFAR-10, 10k images, WRN-28-10): see experiments/cifar10_paper.yaml"
        )
    capped = [f"{u.attack} on the first {u.spec.max_images}" for u in suite.units if u.spec.max_images]
    if capped:
        lines.append("attacks on fewer images: " + ", ".join(dict.fromkeys(capped)))
    return lines


# the command ---------------------------------------------------------------------------------------
def benchmark(cfg: DictConfig) -> dict | None:
    t0 = time.perf_counter()
    redirect_writes_for(cfg)  # library caches and temp files under paths.cache
    suite = build_suite(cfg)
    ensure_weights(cfg, suite)
    spec, classifier, score = load_nets(cfg, suite)
    compiled = compile_net(score) if cfg.benchmark.compile and score is not None else None
    score = compiled if compiled is not None else score
    amp = AMP.get(cfg.trainer.precision)
    defenses = {
        name: build_defense(
            dcfg,
            classifier,
            score,
            channels=spec.channels,
            image_size=spec.image_size,
            amp_dtype=amp,
            name=name,
        )
        for name, dcfg in suite.defenses.items()
    }
    for u in suite.units:  # every impossible attack/defense pair fails here, before any work
        try:
            check_attack(u.spec, defenses[u.defense], u.eps, u.step)
        except ValueError as e:
            raise ConfigError(f"{u.defense}: {e}") from None
    run_dir = open_run_dir(cfg, suite)
    bc = cfg.benchmark
    names = [metric_name(d, NATURAL, p) for d in suite.defenses for p in ("single", "worst_of_n")]
    names += [metric_name(u.defense, u.attack, p) for u in suite.units for p in PROTOCOLS if p != "mean_of_n"]
    module = DefendedClassifier(
        defenses,
        run_dir=str(run_dir),
        seed=cfg.seed,
        batch_size=bc.batch_size,
        worst_of_n=bc.worst_of_n,
        metric_names=names,
        merge=cfg.defense.merge,
        compiled_score=compiled,
    )
    dm = ImageDataModule(cfg.data, cfg.paths, seed=cfg.seed)
    dm.test_n, dm.test_batch_size = bc.n_images, bc.batch_size
    report = ReportCallback(
        run_dir,
        header_lines=header_lines(cfg, suite),
        labels=suite.labels,
        merge=cfg.defense.merge,
        sweep={u.attack: u.eps for u in suite.units if u.sweep},
        order=[
            p
            for d in suite.defenses
            for p in [(d, NATURAL)] + [(u.defense, u.attack) for u in suite.units_of(d)]
        ],
        meta={"config": to_dict(cfg)},
    )
    callbacks = [
        AttackCallback(u, worst_of_n=bc.worst_of_n, ever_broken=bc.ever_broken, image_grid=bc.image_grid)
        for u in suite.units
    ]
    trainer = build_trainer(
        cfg,
        inference_mode=False,
        logger=build_logger(cfg, "benchmark", run_dir),
        callbacks=[*callbacks, report],
        default_root_dir=str(run_dir),
    )
    say(
        f"benchmark: {len(suite.defenses)} defense(s) x {len(suite.units)} attack run(s) on {bc.n_images} images "
        f"-> {run_dir}"
    )
    trainer.test(module, datamodule=dm, verbose=False)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    say(f"benchmark finished in {time.perf_counter() - t0:.0f} s")
    results = run_dir / "results.json"
    return json.loads(results.read_text()) if results.exists() else None
