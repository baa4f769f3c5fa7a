"""`advpure benchmark`: train what is missing, then attack the undefended and the defended
classifier and report natural and robust accuracy under every protocol.

Reads top to bottom:
  1. build_plan       defenses x attacks (advpure.jobs.plan), validated before any work
  2. ensure weights   the nets the plan's defenses name exist (or train them: advpure.jobs.stages)
  3. open_run_dir     resolved config + manifest; refuse a run dir made by other settings
  4. trainer.test     DefendedClassifier (natural accuracy) + one AttackCallback per unit,
                      per-sample records stored per process, resumable batch by batch
  5. ReportCallback   results.{json,csv,md}, plots, console table, W&B (rank 0)
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from advpure.attacks import attack_class, check_attack
from advpure.config.compose import fingerprint, to_dict, to_yaml
from advpure.core.errors import ConfigError
from advpure.data import ImageDataModule
from advpure.data.sources import class_names
from advpure.jobs.artifacts import Artifacts
from advpure.jobs.bench_loop import AttackCallback, DefendedClassifier
from advpure.jobs.loggers import LoggerSpec, build_logger
from advpure.jobs.plan import Plan, build_plan, header_lines, natural_fingerprint, unit_fingerprint
from advpure.jobs.report import ReportCallback
from advpure.jobs.stages import Stages
from advpure.jobs.trainer import build_trainer, launch_rank, say, test_and_read_results
from advpure.nets.compiled import compile_net
from advpure.nets.weights import read_weights
from advpure.purify.defense import build_defense
from advpure.purify.ranges import check_trained_range, purifier_sigmas
from advpure.results import NATURAL, delete_units, metric_name, protocol, with_floors
from advpure.results.report import ReportPlan
from advpure.results.rundir import open_run_dir as open_rundir

AMP = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


# run dir ------------------------------------------------------------------------------------------------
def base_fingerprint(cfg: DictConfig) -> str:
    """What every block of records depends on (the test images, their batches, the protocols)."""
    bc = cfg.benchmark
    return fingerprint(
        {
            "data": cfg.data.name,
            "n_images": bc.n_images,
            "batch_size": bc.batch_size,
            "worst_of_n": bc.worst_of_n,
            "protocols": sorted(bc.protocols),
            "seed": cfg.seed,
        }
    )


def open_run_dir(cfg: DictConfig, plan: Plan, artifacts: Artifacts) -> Path:
    """Create or reopen the run dir (`advpure.results.rundir.open_run_dir`): a run dir some of whose
    blocks were made by other settings is refused, changing nothing, unless benchmark.overwrite=true,
    which deletes those blocks only (all of them when the base settings changed)."""
    weights = {net: artifacts.sha(net) for net in plan.nets}
    units = {f"{d}/{NATURAL}": natural_fingerprint(plan, d, weights) for d in plan.defenses}
    units.update({u.key: unit_fingerprint(plan, u, weights) for u in plan.units})
    return open_rundir(
        cfg.benchmark.run_dir,
        {"base": base_fingerprint(cfg), "units": units},
        config_yaml=to_yaml(cfg),
        section="benchmark",
        things="results",
        base_what="data, images, batch size, protocols or seed",
        delete=lambda run_dir, keys: delete_units(run_dir, [tuple(k.split("/", 1)) for k in keys]),
        resume=cfg.benchmark.resume,
        overwrite=cfg.benchmark.overwrite,
        rank=launch_rank(),
    )


def report_plan(
    plan: Plan, class_names: tuple[str, ...] | None = None, cited: list[str] | None = None
) -> ReportPlan:
    """What the report needs to know about the plan's units (table order, worst case, checks, the
    labels' descriptions and budgets for the figures); `class_names` label the example grid; `cited`:
    the cited tables printed after the results (`benchmark.cited`)."""
    main = list(dict.fromkeys(u.attack for u in plan.table_units))
    kinds = {u.attack: u.spec for u in plan.table_units}
    return ReportPlan(
        order=[(d, NATURAL) for d in plan.defenses]
        + [(u.defense, u.attack) for d in plan.defenses for u in plan.units_of(d) if u.check is None],
        main=main,
        sweep={u.attack: u.eps for u in plan.units if u.sweep},
        hidden={u.attack for u in plan.units if u.check is not None},
        unbounded=next((u.attack for u in plan.units if u.check == "unbounded"), None),
        budget_pairs=list(
            dict.fromkeys((u.attack.split("@")[0], u.attack) for u in plan.units if u.check == "budget")
        ),
        reach={
            u.attack: (int(u.spec.iters), float(u.step), float(u.eps))
            for u in plan.table_units
            if attack_class(u.spec.kind).fixed_step
        },
        black_box=[a for a in main if attack_class(kinds[a].kind).black_box],
        white_box=[
            a for a in main if attack_class(kinds[a].kind).gradient_source(kinds[a]) in ("full", "bpda")
        ],
        descriptions=dict(plan.descriptions),
        eps={u.attack: u.eps for u in plan.units},
        class_names=class_names,
        cited=list(cited or []),
    )


def check_sigmas(plan: Plan, artifacts: Artifacts) -> None:
    """Every noise level a defense asks of the DSM score net (ADP's and Langevin's screening sigma,
    Langevin's dsm_sigma, reverse-VE's sigma*) lies within the levels it was trained on (its weights'
    meta, or the score block that would train it): one ConfigError naming the key, before any work."""
    users = {n: d for n, d in plan.defenses.items() if "score" in plan.needs(n)}
    if not users:
        return
    path = artifacts.path("score")
    meta = read_weights(path).get("meta", {}) if path.exists() else None
    for name, params in users.items():
        check_trained_range(purifier_sigmas(params, f"defense '{name}'"), meta, artifacts.blocks["score"])


def unit_protocols(unit, protocols: list[str]) -> list[str]:
    """The protocols of a unit's rows: the attack's own `protocols` (with their floors) or the
    benchmark's; the check runs need the single draw only (their verdicts feed the Checks section)."""
    if unit.check is not None:
        return ["single"]
    own = unit.spec.get("protocols")
    return with_floors(own) if own is not None else protocols


# the command ---------------------------------------------------------------------------------------
def benchmark(cfg: DictConfig) -> dict | None:
    """Run `advpure benchmark` for the resolved config: train the missing nets (benchmark.train_missing),
    open or resume the run dir, evaluate and attack every defense of the plan on the first
    benchmark.n_images test images, and write results.{md,json,csv}, plots and W&B. Returns
    results.json's content on rank 0 (None on other ranks). Raises ConfigError (bad settings,
    refused before any work), RunDirError (a run dir made by other settings), CheckpointError
    (missing or wrong weights) or NonFiniteError (a net produced NaN/inf)."""
    t0 = time.perf_counter()
    if cfg.trainer.precision == "16-mixed":
        raise ConfigError(
            "trainer.precision=16-mixed: fp16 attack gradients underflow to exactly zero on confident "
            "classifiers, and those images would count as robust (cleverhans#350, auto-attack#51); "
            "use 32-true or bf16-mixed"
        )
    plan = build_plan(cfg)
    stages = Stages.from_config(cfg)
    artifacts = stages.artifacts
    check_sigmas(plan, artifacts)
    stages.ensure(
        sorted(plan.nets, key=list(artifacts.blocks).index), train_missing=cfg.benchmark.train_missing
    )
    nets = artifacts.nets(plan.nets)
    compiled = compile_net(nets["score"]) if cfg.benchmark.compile and "score" in nets else None
    if compiled is not None:
        nets["score"] = compiled
    spec = artifacts.spec
    defenses = {
        name: build_defense(
            params,
            nets["classifier"],
            nets,
            channels=spec.channels,
            image_size=spec.image_size,
            amp_dtype=AMP.get(cfg.trainer.precision),
            name=name,
        )
        for name, params in plan.defenses.items()
    }
    for u in plan.units:  # every impossible attack/defense pair fails here, before any work
        try:
            check_attack(u.spec, defenses[u.defense], u.eps, u.step)
        except ValueError as e:
            raise ConfigError(f"{u.defense}: {e}") from None
    run_dir = open_run_dir(cfg, plan, artifacts)
    bc = cfg.benchmark
    protocols = with_floors(bc.protocols)
    clean = [p for p in protocols if protocol(p).run != "clean" and not protocol(p).needs_path]
    names = [metric_name(d, NATURAL, p) for d in plan.defenses for p in clean]
    names += [metric_name(u.defense, u.attack, p) for u in plan.units for p in unit_protocols(u, protocols)]
    module = DefendedClassifier(
        defenses,
        run_dir=str(run_dir),
        seed=cfg.seed,
        batch_size=bc.batch_size,
        worst_of_n=bc.worst_of_n,
        protocols=protocols,
        metric_names=names,
        merge=cfg.defense.merge,
        compiled_score=compiled,
    )
    dm = ImageDataModule(cfg.data, cfg.paths, seed=cfg.seed)
    dm.test_n, dm.test_batch_size = bc.n_images, bc.batch_size
    report = ReportCallback(
        run_dir,
        header_lines=header_lines(cfg, plan),
        labels=plan.labels,
        merge=cfg.defense.merge,
        plan=report_plan(plan, class_names(cfg.data.name, cfg.data.root, cfg.paths.data), list(bc.cited)),
        meta={"config": to_dict(cfg)},
    )
    callbacks = [
        AttackCallback(
            u, worst_of_n=bc.worst_of_n, protocols=unit_protocols(u, protocols), image_grid=bc.image_grid
        )
        for u in plan.units
    ]
    trainer = build_trainer(
        cfg.trainer,
        inference_mode=False,
        logger=build_logger(LoggerSpec.from_config(cfg), "benchmark", run_dir),
        callbacks=[*callbacks, report],
        default_root_dir=str(run_dir),
    )
    say(
        f"benchmark: {len(plan.defenses)} defense(s) x {len(plan.units)} attack run(s) on {bc.n_images} images "
        f"-> {run_dir}"
    )
    return test_and_read_results(trainer, module, dm, run_dir, "benchmark", t0)
