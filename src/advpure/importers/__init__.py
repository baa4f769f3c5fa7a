"""Published weights in: `advpure import-weights <source> ...` and the loaders behind it.

  advpure import-weights ncsnv2 <checkpoint.pth> <out/score.pt> [--ema] [--any-sigmas]

* ``ncsnv2``: the NCSNv2 CIFAR-10 checkpoint of Song & Ermon (2020) -> an advpure score weights file
  (`advpure.importers.ncsnv2.import_ncsnv2`).
* RobustBench classifiers load directly from RobustBench's model directory
  (`advpure.importers.robustbench.load_robustbench_classifier`); they need no conversion.
"""

from __future__ import annotations

import argparse

from advpure.core.errors import ConfigError

__all__ = ["main"]

EPILOG = """examples:
  advpure import-weights ncsnv2 checkpoint.pth artifacts/cifar10/score.pt
  advpure import-weights ncsnv2 checkpoint.pth artifacts/cifar10/score_ema.pt --ema
then point the config at it: score=ncsnv2_cifar10 score.weights=artifacts/cifar10/score.pt
"""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one ConfigError line (exit code 2 via the CLI)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise ConfigError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="advpure import-weights",
        description="Convert published weights into advpure weights files (nothing is downloaded).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="source", metavar="SOURCE", required=True)
    n = sub.add_parser(
        "ncsnv2",
        help="the NCSNv2 checkpoint of ermongroup/ncsnv2 (Song & Ermon 2020) -> score weights",
        description="Convert the reference NCSNv2 checkpoint (the list [state_dict, optimizer, epoch, step, "
        "ema_shadow] saved by ermongroup/ncsnv2) into an advpure score weights file for score=ncsnv2_cifar10. "
        "The net's raw output f is used (ADP), not f / sigma.",
    )
    n.add_argument("checkpoint", help="the .pth file (read with torch.load(weights_only=True))")
    n.add_argument("out", help="the advpure weights file to write (e.g. artifacts/cifar10/score.pt)")
    n.add_argument(
        "--ema", action="store_true", help="take the EMA shadow (list element 4) instead of element 0"
    )
    n.add_argument(
        "--any-sigmas",
        action="store_true",
        help="import even if the checkpoint's sigmas are not the CIFAR-10 schedule (232 levels 50 -> 0.01)",
    )
    return p


def main(argv: list[str]) -> int:
    """Run `advpure import-weights` with the arguments after the command; returns the exit code.

    Errors are raised as `advpure.core.errors` exceptions (the CLI prints them as one line): ConfigError for
    a usage mistake, CheckpointError for a bad input file."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    if args.source == "ncsnv2":
        from advpure.importers.ncsnv2 import import_ncsnv2

        out, meta = import_ncsnv2(args.checkpoint, args.out, ema=args.ema, any_sigmas=args.any_sigmas)
        print(
            f"import-weights: {out} <- {meta['source_file']} ({meta['element']}, step {meta['step']}, "
            f"{meta['parameters']:,} parameters, sha256 {meta['source_sha256'][:12]}...)"
        )
        return 0
    raise ConfigError(f"import-weights: unknown source {args.source!r}")  # unreachable: argparse checks it
