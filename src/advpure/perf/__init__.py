"""Performance suite of advpure: `python -m advpure.perf [--quick] [--device cuda] [--threads N]`.

`advpure.perf.run` runs the sections that the figure modules register (`p1_purification`,
`p2_bpda`, `p2_score_evals`, `p3_full_gradient`, `p4_dsm`, `throughput`, `formats`, `threads`) with
the timing of `advpure.perf.timing`, the shared nets and context of `advpure.perf.harness` and the
report of `advpure.perf.report`; `advpure.perf.reference` holds the loop-structured reference
implementations (the original ADP code's structure) that the batched code is compared with, and
`advpure.perf.memory` the peak-memory probe. See experiments/perf/README.md for what each figure
means and the latest numbers.
"""

from advpure.perf.run import main

__all__ = ["main"]
