"""Published weights in: `advpure import-weights <source> ...` and the readers behind it.

Every network kind names its importers (`NetKind.importers`, `advpure.nets.registry.Importer`); the
command has one subcommand per importer of every registered kind (plugins included):

  advpure import-weights ncsnv2 <checkpoint.pth> <out/score.pt> [--ema] [--any-sigmas]
  advpure import-weights score_sde <checkpoint_8.pth> <out/ddpmpp.pt> [--no-ema] [--config NAME]
  advpure import-weights ddpm <model-790000.ckpt> <out/ddpm.pt> [--config NAME]
  advpure import-weights adm <256x256_diffusion_uncond.pt> <out/adm.pt> [--config NAME]

RobustBench classifiers load directly from RobustBench's model directory
(`advpure.importers.robustbench.load_robustbench_classifier`); they need no conversion.
"""

from __future__ import annotations

import argparse

from advpure.core.errors import ConfigError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one ConfigError line (exit code 2 via the CLI)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise ConfigError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def importers() -> dict[str, tuple[str, type]]:
    """{source: (network kind, Importer)} of every registered kind."""
    import advpure.kinds  # noqa: F401 (registers the built-in kinds)
    from advpure.nets.registry import NET_KINDS

    return {src: (kind, imp) for kind, cls in NET_KINDS.items() for src, imp in cls.importers.items()}


def _parser() -> argparse.ArgumentParser:
    sources = importers()
    examples = "\n".join(
        f"  {getattr(imp, 'example', '')}" for _, imp in sources.values() if getattr(imp, "example", "")
    )
    p = _Parser(
        prog="advpure import-weights",
        description="Convert published weights into advpure weights files (nothing is downloaded).",
        epilog=f"examples:\n{examples}\nthen point the config at the file (e.g. score.weights=...)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="source", metavar="SOURCE", required=True)
    for source, (kind, imp) in sources.items():
        s = sub.add_parser(source, help=f"{imp.help} [{kind}]", description=imp.description)
        imp.add_arguments(s)
        s.add_argument("--force", action="store_true", help="replace an existing output file")
    return p


def main(argv: list[str]) -> int:
    """Run `advpure import-weights` with the arguments after the command; returns the exit code.

    Errors are raised as `advpure.core.errors` exceptions (the CLI prints them as one line): ConfigError
    for a usage mistake, CheckpointError for a bad input file."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    _, imp = importers()[args.source]
    print(imp.run(args))
    return 0
