"""Performance suite of advpure: `python -m advpure.perf [--quick] [--device cuda] [--threads N]`.

`advpure.perf.run` runs the sections that the figure modules register (`p1_purification`,
`p2_bpda`, `p2_score_evals`, `p3_full_gradient`, `p4_dsm`, `flops`, `probe_bench`, `throughput`,
`formats`, `threads`) with the timing of `advpure.perf.timing`, the shared nets and context of
`advpure.perf.harness`, the peaks and FLOP rates of `advpure.perf.peak` and the report of
`advpure.perf.report`; `advpure.perf.reference` holds the loop-structured reference
implementations (the original ADP code's structure) that the batched code is compared with, and
`advpure.perf.memory` the peak-memory probe. `python -m advpure.perf.gpu_check` is the one-command
check of a GPU machine (`advpure.perf.gpu_check`). See experiments/perf/README.md.

Importing the package imports nothing else: `gpu_check` must run where omegaconf is not
installed, and the suite's command line (`run`) needs it.
"""


def main(argv: list[str] | None = None) -> int:
    """`advpure.perf.run.main` (imported on call: it loads the config machinery)."""
    from advpure.perf.run import main as run_main

    return run_main(argv)


__all__ = ["main"]
