"""Results layer: per-sample records on disk, protocols, statistics, tables and plots.

Every reported accuracy is recomputed from per-sample records (`store`), turned into rows by
`tables.summarize`, and rendered from those rows only; see each module for the why. The plots are
imported on first use: loading a config (which reads the protocol registry) must not import
matplotlib, which writes its caches at import time, before the run has pointed them elsewhere.
"""

from advpure.results.protocols import (
    PROTOCOLS,
    Observations,
    Protocol,
    check_consistency,
    metric_name,
    protocol,
    protocol_records,
    records_for,
    register_protocol,
    with_floors,
)
from advpure.results.rundir import (
    clear,
    delete_units,
    load_batches,
    load_certificates,
    load_examples,
    load_records,
    load_stats,
    load_traces,
    rank_files,
)
from advpure.results.stats import accuracy, wilson
from advpure.results.store import NATURAL, Batch, Example, Record, RecordStore
from advpure.results.tables import (
    CITED_HEADING,
    columns,
    protocols_in,
    read_csv,
    read_json,
    stat_protocols,
    summarize,
    to_console,
    to_csv,
    to_json,
    to_markdown,
)

__all__ = [
    "NATURAL",
    "PROTOCOLS",
    "Observations",
    "Protocol",
    "columns",
    "delete_units",
    "metric_name",
    "protocol",
    "protocols_in",
    "stat_protocols",
    "register_protocol",
    "with_floors",
    "CITED_HEADING",
    "Batch",
    "Example",
    "Record",
    "RecordStore",
    "accuracy",
    "check_consistency",
    "clear",
    "load_batches",
    "load_certificates",
    "load_stats",
    "load_examples",
    "load_records",
    "load_traces",
    "plot_image_grid",
    "plot_loss_curves",
    "plot_robust_vs_eps",
    "protocol_records",
    "rank_files",
    "read_csv",
    "read_json",
    "records_for",
    "summarize",
    "to_console",
    "to_csv",
    "to_json",
    "to_markdown",
    "wilson",
]


import importlib

_LAZY = {"plot_image_grid": "plots", "plot_loss_curves": "plots", "plot_robust_vs_eps": "plots"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"advpure.results.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'advpure.results' has no attribute {name!r}")
