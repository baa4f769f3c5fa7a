"""Command line: `advpure <command> [group=option ...] [dotted.key=value ...]` (or `python -m advpure`).

    advpure train experiment=fmnist trainer.max_epochs=3
    advpure benchmark experiment=fmnist benchmark.n_images=100
    advpure config experiment=cifar10_paper defense.sigma=0.1      # print the resolved config

Config mistakes print one line and exit with code 2; other user-facing errors exit with 1.
"""

from __future__ import annotations

import sys

from advpure.errors import AdvpureError

COMMANDS = {
    "train": "train the classifier, then the score model (each skipped when its weights exist)",
    "benchmark": "train what is missing, attack the undefended and defended classifier, write results",
    "config": "print the resolved config and exit",
    "certify": "randomized-smoothing l2 certificates (noisy / denoised / ADP bases): table + plot",
    "import-weights": "convert published weights (NCSNv2 CIFAR-10 checkpoint): import-weights ncsnv2 IN OUT",
}

USAGE = """usage: advpure <command> [experiment=NAME] [group=option ...] [key=value ...]

commands:
{commands}

groups: data, classifier, score, defense, attack (a list: attack=[a,b]), trainer, logger
examples:
  advpure train experiment=fmnist trainer.max_epochs=3
  advpure benchmark experiment=fmnist attack=[pgd40_blind,bpda40_eot15] benchmark.n_images=64
  advpure config experiment=cifar10_paper
"""


def _usage() -> str:
    from advpure.config import experiment_names

    lines = "\n".join(f"  {name:<10} {text}" for name, text in COMMANDS.items())
    try:
        exps = ", ".join(experiment_names())
    except AdvpureError:
        exps = "?"
    return USAGE.format(commands=lines) + f"experiments: {exps}\n"


def _quiet_lightning() -> None:
    """Keep the console for our progress and tables: drop Lightning's tips and a SLURM hint that
    fires whenever `srun` is installed but not used."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*The `srun` command is available.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, overrides = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"advpure: error: unknown command '{command}'; allowed: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if command == "import-weights":  # argparse-style arguments, not config overrides
        from advpure.importers import main as import_weights

        return import_weights(overrides)
    from advpure import config as C

    _quiet_lightning()
    cfg = C.load(None, overrides)
    if command == "config":
        print(C.to_yaml(cfg), end="")
        return 0
    if command == "train":
        from advpure.train import train

        train(cfg)
        return 0
    if command == "certify":
        from advpure.certify_run import certify

        certify(cfg)
        return 0
    from advpure.benchmark import benchmark

    benchmark(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run(argv)
    except AdvpureError as e:
        print(f"advpure: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("advpure: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
