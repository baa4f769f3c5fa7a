"""Command line: `advpure <command> [group=option ...] [dotted.key=value ...]` (or `python -m advpure`).

    advpure train experiment=fmnist trainer.max_epochs=3
    advpure benchmark experiment=fmnist benchmark.n_images=100
    advpure config experiment=cifar10_paper defense.sigma=0.1      # print the resolved config
    advpure benchmark --help                                      # a command's groups, keys, examples

Config mistakes print one line and exit with code 2; other user-facing errors exit with 1.
A command is one `Command` entry in `COMMANDS`: its `run` gets the arguments after its name.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from advpure.core.errors import AdvpureError, ConfigError, Interrupted

HELP_FLAGS = ("-h", "--help")


@dataclass(frozen=True)
class Command:
    """One `advpure <name>` command: what it runs and what its `--help` shows.

    `groups` are the config groups it reads, `sections` the top-level config keys whose schema
    keys its help lists (None: all); KINDS in either stands for every registered network kind
    (their blocks and groups: classifier, score, ebm, ...). `usage` replaces the default key=value
    usage line.
    """

    name: str
    summary: str
    run: Callable[[list[str]], int]
    description: str = ""
    groups: tuple[str, ...] = ()
    sections: tuple[str, ...] | None = ()
    examples: tuple[str, ...] = ()
    usage: str | None = None
    raw: bool = False  # `run` parses its own arguments (argparse), --help included

    def help(self) -> str:
        from advpure.config.help import command_help

        return command_help(
            self.name,
            summary=self.summary,
            description=self.description,
            usage=self.usage,
            groups=_expand(self.groups),
            sections=None if self.sections is None else _expand(self.sections),
            examples=self.examples,
        )


def _load(args: list[str]):
    from advpure.config import compose as C

    return C.load(None, args)


def _run_config(args: list[str]) -> int:
    from advpure.config import compose as C

    print(C.to_yaml(_load(args)), end="")
    return 0


def _job(module: str, function: str) -> Callable[[list[str]], int]:
    """A command that loads the config, makes the process settings (`advpure.core.runtime.configure`:
    library caches and temp files under paths.cache before torch, Lightning, matplotlib and W&B are
    imported; torch threads), then runs `module.function(cfg)`."""

    def run(args: list[str]) -> int:
        import importlib

        from advpure.core.runtime import configure_for

        cfg = _load(args)
        configure_for(cfg)
        _quiet_lightning()
        getattr(importlib.import_module(module), function)(cfg)
        return 0

    return run


def _run_import_weights(args: list[str]) -> int:
    from advpure.importers import main as import_weights

    return import_weights(args)


_run_train = _job("advpure.jobs.train", "train")
_run_certify = _job("advpure.jobs.certify", "certify")
_run_benchmark = _job("advpure.jobs.benchmark", "benchmark")


KINDS = "<network kinds>"


def _expand(names: tuple[str, ...]) -> tuple[str, ...]:
    """`names` with KINDS replaced by the registered network kinds (plugins included)."""
    if KINDS not in names:
        return names
    from advpure.config.compose import train_stages
    from advpure.nets.registry import NET_KINDS

    train_stages()  # registers the built-in kinds
    kinds = tuple(k for k in NET_KINDS if ":" not in k)
    i = names.index(KINDS)
    return (*names[:i], *kinds, *names[i + 1 :])


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command(
            "train",
            "train the stages of train.stages (every network kind with a training stage), each skipped when its weights exist",
            _run_train,
            description=(
                "Writes each stage's weights (e.g. artifacts/<dataset>/{classifier,score}.pt, paths.artifacts) and\n"
                "Lightning checkpoints under runs/train/<experiment>/<stage>/ (paths.runs); a killed run resumes\n"
                "from its newest checkpoint. Stages: the trainable network kinds (train.stages=[...])."
            ),
            groups=("data", KINDS, "trainer", "logger"),
            sections=("", "paths", "data", KINDS, "trainer", "logger", "train"),
            examples=(
                "advpure train experiment=fmnist trainer.max_epochs=3",
                "advpure train experiment=fmnist train.stages=[score] score.max_steps=5000",
                "advpure train experiment=cifar10_paper trainer.devices=4 trainer.strategy=ddp",
            ),
        ),
        Command(
            "benchmark",
            "train what is missing, attack the undefended and defended classifier, write results",
            _run_benchmark,
            description=(
                "Attacks the first benchmark.n_images test images with every selected attack and reports\n"
                "natural and robust accuracy (single draw, worst of N, ever broken) in\n"
                "runs/benchmark/<experiment>/results.{md,json,csv}; a rerun resumes from stored batches."
            ),
            groups=("data", KINDS, "defense", "attack", "trainer", "logger"),
            sections=("", "paths", "data", "defense", "attacks", "benchmark", "trainer", "logger"),
            examples=(
                "advpure benchmark experiment=fmnist",
                "advpure benchmark experiment=fmnist attack=[pgd40_blind,bpda40_eot15] benchmark.n_images=64",
                "advpure benchmark experiment=fmnist defense.sigma=0.1 attacks.bpda40_eot15.eot=8",
                "advpure benchmark experiment=cifar10_paper trainer.devices=4 trainer.strategy=ddp",
            ),
        ),
        Command(
            "certify",
            "randomized-smoothing l2 certificates (noisy / denoised / ADP bases): table + plot",
            _run_certify,
            description=(
                "Certifies every certify.skip-th test image by randomized smoothing (Cohen et al. 2019) for\n"
                "each sigma in certify.sigmas and base in certify.bases; writes runs/certify/<experiment>/\n"
                "results.{md,json,csv} and plots/certified_accuracy.png; a rerun resumes from stored images."
            ),
            groups=("data", KINDS, "defense", "trainer", "logger"),
            sections=("", "paths", "data", "defense", "certify", "trainer", "logger"),
            examples=(
                "advpure certify experiment=fmnist_certify",
                "advpure certify experiment=fmnist_certify certify.sigmas=[0.25] certify.bases=[denoised]",
                "advpure certify experiment=cifar10_certify trainer.devices=4 trainer.strategy=ddp",
            ),
        ),
        Command(
            "import-weights",
            "convert published weights (every network kind's importers): import-weights SOURCE IN OUT",
            _run_import_weights,
            usage="advpure import-weights <source> <checkpoint> <out.pt> [options]",
            raw=True,
        ),
        Command(
            "config",
            "print the resolved config and exit",
            _run_config,
            description="Composes the schema, conf/ groups, the experiment and the overrides, and prints YAML.",
            groups=("data", KINDS, "defense", "attack", "trainer", "logger"),
            sections=None,
            examples=(
                "advpure config experiment=fmnist",
                "advpure config experiment=cifar10_paper defense.sigma=0.1",
            ),
        ),
    )
}

USAGE = """usage: advpure <command> [experiment=NAME] [group=option ...] [key=value ...]
       advpure <command> --help

commands:
{commands}

groups: {groups} (attack is a list: attack=[a,b])
examples:
  advpure train experiment=fmnist trainer.max_epochs=3
  advpure benchmark experiment=fmnist attack=[pgd40_blind,bpda40_eot15] benchmark.n_images=64
  advpure config experiment=cifar10_paper
  advpure benchmark --help
"""


def _usage() -> str:
    from advpure.config.compose import experiment_names

    width = max(len(c) for c in COMMANDS)
    lines = "\n".join(f"  {c.name:<{width}} {c.summary}" for c in COMMANDS.values())
    try:
        exps = ", ".join(experiment_names())
    except AdvpureError:
        exps = "?"
    return (
        USAGE.format(
            commands=lines,
            groups=", ".join(_expand(("data", KINDS, "defense", "attack", "trainer", "logger"))),
        )
        + f"experiments: {exps}\n"
    )


def _quiet_lightning() -> None:
    """Keep the console for our progress and tables: drop Lightning's tips and a SLURM hint that
    fires whenever `srun` is installed but not used."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*The `srun` command is available.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    # a DDP rank without evaluation batches syncs metrics it never updated (the others did)
    warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run(argv: list[str]) -> int:
    if not argv or argv[0] in (*HELP_FLAGS, "help"):
        topic = argv[1] if len(argv) > 1 and argv[0] == "help" else None
        if topic in COMMANDS:
            print(COMMANDS[topic].help(), end="")
        else:
            print(_usage())
        return 0
    name, args = argv[0], argv[1:]
    command = COMMANDS.get(name)
    if command is None:
        print(f"advpure: error: unknown command '{name}'; allowed: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if command.raw:  # argparse parses its own arguments; --help shows the (sub)command's help
        if any(a in HELP_FLAGS for a in args):  # key=value settings before --help are not its arguments
            args = [a for a in args if "=" not in a]
        try:
            return command.run(args)
        except SystemExit as e:  # argparse's --help exits
            return int(e.code or 0)
    if any(a in HELP_FLAGS for a in args):
        print(command.help(), end="")
        return 0
    if command.usage is None:  # key=value commands: an option-like token is a mistake, not a key
        for a in args:
            if a.startswith("-"):
                raise ConfigError(
                    f"unknown option '{a}'; settings are key=value (see `advpure {name} --help`)"
                )
    return command.run(args)


def main(argv: list[str] | None = None) -> int:
    from advpure.core.registry import load_plugins
    from advpure.core.runtime import set_wait_policy
    from advpure.jobs.loggers import forget_inherited_wandb_service

    set_wait_policy()  # before anything imports torch
    forget_inherited_wandb_service()
    argv = sys.argv[1:] if argv is None else argv
    try:
        load_plugins(os.environ.get("ADVPURE_PLUGINS"))
        return run(argv)
    except Interrupted as e:
        print(f"advpure: {e}", file=sys.stderr)
        return e.exit_code
    except AdvpureError as e:
        print(f"advpure: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("advpure: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
