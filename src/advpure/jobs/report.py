"""Report callbacks: when the test loop ends, every rank flushes its store, rank 0 turns all
processes' records into the results files and plots, prints the table, and sends the same numbers,
the table and the plots to W&B. `ReportCallback` reports a benchmark; `advpure.jobs.certify` has the
certification one; both are a `RecordsReport`."""

from __future__ import annotations

import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from advpure.results import protocols_in
from advpure.results.report import write_report


class RecordsReport(Callback):
    """Base: `write(trainer, pl_module) -> report` on rank 0 after every rank's store is closed, then
    the console table and, for each W&B logger, `wandb_table(wandb) -> (key, table)` logged with the
    report's `metrics` (also set as summary) and `plots` (as images).

    The report is the dict returned by `advpure.results.report.write_report` (or its certify
    counterpart): at least "console", "metrics" {key: float}, "plots" {name: path}, "rows", and
    optionally "captions" {name: caption} (the text under each figure in results.md)."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.report: dict | None = None

    def write(self, trainer, pl_module) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def wandb_table(self, wandb):  # pragma: no cover - abstract
        raise NotImplementedError

    def on_test_end(self, trainer, pl_module):
        pl_module.store.close()  # flush this rank's store before rank 0 reads every store
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if not trainer.is_global_zero:
            return
        self.report = self.write(trainer, pl_module)
        print("\n" + self.report["console"] + f"\n\nresults: {self.run_dir}/results.md", flush=True)
        for logger in trainer.loggers:
            if logger.__class__.__name__ == "WandbLogger":
                self._to_wandb(logger.experiment)

    def _to_wandb(self, run) -> None:
        import wandb

        key, table = self.wandb_table(wandb)
        payload = {key: table, **self.report["metrics"]}
        captions = self.report.get("captions", {})
        for name, path in self.report[
            "plots"
        ].items():  # the PNGs of the run dir, their captions as in results.md
            payload[f"plots/{name}"] = wandb.Image(str(path), caption=captions.get(name))
        run.log(payload)
        for k, v in self.report["metrics"].items():
            run.summary[k] = v
        # finish here, in the process that owns the run: a DDP child forked by Lightning exits
        # without running atexit hooks, and the offline run file must be complete for `wandb sync`
        run.finish()


class ReportCallback(RecordsReport):
    """The benchmark's report of `run_dir` (see the module docstring)."""

    def __init__(self, run_dir, *, header_lines, labels, merge, plan, meta):
        super().__init__(run_dir)
        self.header_lines, self.labels = header_lines, labels
        self.merge, self.plan, self.meta = merge, plan, meta

    def write(self, trainer, pl_module) -> dict:
        return write_report(
            self.run_dir,
            header_lines=self.header_lines,
            labels=self.labels,
            merge=self.merge,
            plan=self.plan,
            meta={**self.meta, "compile_seconds": getattr(pl_module, "compile_seconds", None)},
        )

    def wandb_table(self, wandb):
        rows = [r for r in self.report["rows"] if r["merge"] == self.merge]
        columns = [
            "defense",
            "attack",
            "natural",
            "single_lo",
            "single_hi",
            *protocols_in(rows),
            "n",
            "score_evals_per_img",
            "seconds_per_img",
        ]
        data = [[r["defense_label"], r["attack_label"], *(r.get(c) for c in columns[2:])] for r in rows]
        return "results", wandb.Table(columns=columns, data=data)
