"""The performance suite's report: every figure (value, unit, goal, met, note) and check, printed
as it is measured and as a table at the end, profiles of missed goals, and the machine it ran on.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
from collections.abc import Callable

import torch

from advpure.perf.memory import clean_heap
from advpure.perf.timing import profile_gap, profile_top


def fmt(v: float) -> str:
    """A figure for printing: 4 significant digits below 1, 3 decimals up to 100, none up to 1e5."""
    if v == 0 or not math.isfinite(v):
        return str(v)
    a = abs(v)
    if a >= 1e5:
        return f"{v:.3e}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 1:
        return f"{v:.3f}"
    return f"{v:.4g}"


class Report:
    """What a run measured: `figures` {key: value, unit, goal, met, note}, `checks` {key: ok, ...},
    `profiles` {key: top-op records} and `notes`; each is printed when it is added."""

    def __init__(self) -> None:
        self.figures: dict[str, dict] = {}
        self.checks: dict[str, dict] = {}
        self.profiles: dict[str, list[dict]] = {}
        self.notes: list[str] = []
        self.pending: list[tuple] = []
        self._all_ops: dict[str, dict[str, tuple[int, float]]] = {}

    def add(
        self,
        key: str,
        value: float,
        unit: str = "",
        goal: tuple[str, float] | None = None,
        note: str = "",
        rate=None,
    ) -> bool | None:
        """Record figure `key`; `goal` = ("<=" or ">=", bound); `rate`: the achieved GFLOP/s and % of
        peak of the figure's measurement (`advpure.perf.peak.Rate`), printed beside it. Returns
        whether the goal is met (None without a goal)."""
        value = float(value)
        met = None
        if goal is not None:
            met = value <= goal[1] if goal[0] == "<=" else value >= goal[1]
        self.figures[key] = {
            "value": value,
            "unit": unit,
            "goal": f"{goal[0]} {goal[1]:g}" if goal else "",
            "met": met,
            "note": note,
        }
        if rate is not None:
            self.figures[key]["rate"] = rate.as_dict()
        mark = "" if met is None else ("  goal " + self.figures[key]["goal"] + (" met" if met else " MISSED"))
        peak = f"  [{rate.text()}]" if rate is not None else ""
        print(
            f"  {key:<52} {fmt(value):>12} {unit}{mark}{peak}" + (f"   ({note})" if note else ""), flush=True
        )
        return met

    def check(self, key: str, ok: bool, **detail) -> None:
        """Record a correctness check (`detail`: the numbers behind it, e.g. max_abs_diff)."""
        self.checks[key] = {
            "ok": bool(ok),
            **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in detail.items()},
        }
        extra = ", ".join(f"{k}={fmt(v) if isinstance(v, float) else v}" for k, v in detail.items())
        print(f"  check {key:<46} {'OK' if ok else 'FAILED'}  {extra}", flush=True)

    def note(self, text: str) -> None:
        """Record a remark (a skipped measurement, a numerical difference)."""
        self.notes.append(text)
        print(f"  note: {text}", flush=True)

    def profile(
        self, key: str, fn: Callable[[], object], device: torch.device, why: str, versus: str | None = None
    ) -> None:
        """Queue a profile; `run_profiles` runs them after every measurement (a profiled run
        leaves ~1 GB of reference cycles behind and would slow the measurements after it)."""
        self.pending.append((key, fn, device, why, versus))
        print(f"  (profile [{key}] queued: {why})", flush=True)

    def run_profiles(self) -> None:
        """Run the queued profiles; print each one's top ops (and, with `versus`, the ops that
        account for the difference to that earlier profile)."""
        while self.pending:
            key, fn, device, why, versus = self.pending.pop(0)
            try:
                table, recs, all_ops = profile_top(fn, device)
            except Exception as e:  # noqa: BLE001 - a profile is an explanation, never a crash
                self.note(f"profile of {key} failed: {type(e).__name__}: {e}")
                continue
            finally:
                clean_heap()
            self.profiles[key] = recs
            top = recs[0] if recs else {"op": "?", "share": 0.0}
            print(
                f"\n  profile [{key}] ({why}); dominant op {top['op']} ({100 * top['share']:.0f}% of self CPU)"
                f" — top ops by self CPU time:\n{table}",
                flush=True,
            )
            self._all_ops[key] = all_ops
            if versus is not None and versus in self._all_ops:
                gap, grecs = profile_gap(all_ops, self._all_ops[versus])
                self.profiles[f"{key}-minus-{versus}"] = grecs
                print(f"  where [{key}] spends more than [{versus}]:\n{gap}", flush=True)

    def table(self) -> str:
        """Every figure and check as a fixed-width table."""
        head = f"{'figure':<54} {'value':>12}  {'unit':<22} {'goal':<9} {'met?':<5} {'GFLOP/s':>8} {'%mm':>6} {'%conv':>6}"
        lines = [head, "-" * len(head)]
        for k, f in self.figures.items():
            met = "" if f["met"] is None else ("yes" if f["met"] else "NO")
            r = f.get("rate") or {}
            peak = "".join(
                f" {fmt(v) if v is not None else '':>{w}}"
                for v, w in ((r.get("gflops"), 8), (r.get("pct_matmul_peak"), 6), (r.get("pct_conv_peak"), 6))
            )
            lines.append(f"{k:<54} {fmt(f['value']):>12}  {f['unit'][:22]:<22} {f['goal']:<9} {met:<5}{peak}")
        for k, c in self.checks.items():
            lines.append(f"{'check ' + k:<54} {'OK' if c['ok'] else 'FAILED':>12}")
        return "\n".join(lines)


# --- machine --------------------------------------------------------------------------------------
def machine(device: torch.device) -> dict:
    """What the numbers were measured on: date, CPU model and relevant flags (/proc/cpuinfo),
    cores, load average, torch/Python versions, threads, device and its name."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("unknown", platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_model": model,
        "cpu_flags": sorted(
            flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni"}
        ),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else model,
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
    }
    return info
