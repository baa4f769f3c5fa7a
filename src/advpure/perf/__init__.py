"""Performance suite of advpure: `python -m advpure.perf [--quick] [--device cuda] [--threads N]`.

`advpure.perf.suite` holds the measurements, `advpure.perf.reference` the loop-structured
reference implementations (the original ADP code's structure) that the batched code is compared
with. See experiments/perf/README.md for what each figure means and the latest numbers.
"""

from advpure.perf.suite import main

__all__ = ["main"]
