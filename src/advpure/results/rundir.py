"""A run directory's records: every rank's store file (`records/rank<r>.sqlite`, see
`advpure.results.store`) merged and deduplicated by key, deletion of blocks or everything, and the
manifest that ties each block of records to the settings that made it (`open_run_dir`).

The same key in two files with the same value is normal (a batch redone by another rank after a
resume with a different world size); different values raise `RunDirError` naming the key.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist

from advpure.core.errors import RunDirError
from advpure.core.fsio import storage_errors, write_text_atomic
from advpure.results.lock import lock_run_dir
from advpure.results.store import Batch, Example, Record, RecordStore, records_dir


def rank_files(run_dir: str | Path) -> list[Path]:
    """`records/rank*.sqlite`, ordered by rank number (journal files are not matched)."""
    files = [p for p in records_dir(run_dir).glob("rank*.sqlite") if re.fullmatch(r"rank\d+\.sqlite", p.name)]
    return sorted(files, key=lambda p: int(p.name[4:-7]))


def _each_store(run_dir: str | Path):
    for path in rank_files(run_dir):
        with RecordStore(path) as store:
            yield path, store


def load_records(run_dir: str | Path) -> list[Record]:
    """Every record of every rank file, deduplicated by key and sorted by key.

    The same key in two files with the same value is normal (a batch redone by another rank after
    a resume with a different world size); different values raise `RunDirError` naming the key.
    """
    merged: dict[tuple, tuple[float, Path]] = {}
    for path, store in _each_store(run_dir):
        for r in store.records():
            seen = merged.get(r.key)
            if seen is None:
                merged[r.key] = (r.value, path)
            elif seen[0] != r.value:
                raise RunDirError(
                    f"conflicting record {r.key}: {seen[0]} in {seen[1]}, {r.value} in {path}; "
                    "two runs disagree — delete the run dir or use a new one"
                )
    return [Record(*key, value) for key, (value, _) in sorted(merged.items())]


def load_batches(run_dir: str | Path) -> list[Batch]:
    """Every done marker, one per (defense, attack, batch); the lowest rank's copy wins.

    Two copies of a batch must cover the same images; their costs may differ (timing noise) and
    are not added, so that cost per image stays the cost of attacking each image once.
    """
    merged: dict[tuple, tuple[Batch, Path]] = {}
    for path, store in _each_store(run_dir):
        for b in store.batches():
            key = (b.defense, b.attack, b.batch)
            seen = merged.get(key)
            if seen is None:
                merged[key] = (b, path)
            elif (seen[0].first_idx, seen[0].n) != (b.first_idx, b.n):
                raise RunDirError(
                    f"conflicting batch {key}: images [{seen[0].first_idx}, +{seen[0].n}) in {seen[1]}, "
                    f"[{b.first_idx}, +{b.n}) in {path}"
                )
    return [b for _, (b, _) in sorted(merged.items())]


def load_traces(run_dir: str | Path) -> dict[tuple[str, str], dict[int, np.ndarray]]:
    """`{(defense, attack): {idx: float32 loss per iteration}}`, merged over ranks."""
    out: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for _, store in _each_store(run_dir):
        for d, a, i, losses in store.traces():
            out.setdefault((d, a), {}).setdefault(i, losses)
    return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}


def load_examples(run_dir: str | Path) -> list[Example]:
    """Every stored example (first copy of each (defense, attack, idx)), sorted by that key."""
    out: dict[tuple, Example] = {}
    for _, store in _each_store(run_dir):
        for e in store.examples():
            out.setdefault((e.defense, e.attack, e.idx), e)
    return [e for _, e in sorted(out.items(), key=lambda kv: kv[0])]


def load_stats(run_dir: str | Path) -> dict[tuple[str, str], dict[str, dict[int, float]]]:
    """`{(defense, attack): {name: {idx: value}}}`: per-sample diagnostics, merged over ranks."""
    out: dict[tuple[str, str], dict[str, dict[int, float]]] = {}
    for _, store in _each_store(run_dir):
        for d, a, i, name, v in store.stats():
            out.setdefault((d, a), {}).setdefault(name, {}).setdefault(i, v)
    return out


def load_certificates(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every stored certificate, one per (base, sigma, idx) (the lowest rank's copy), sorted."""
    out: dict[tuple, dict[str, Any]] = {}
    for _, store in _each_store(run_dir):
        for r in store.certificates():
            out.setdefault((r["base"], r["sigma"], r["idx"]), r)
    return [r for _, r in sorted(out.items())]


def delete_certificate_units(run_dir: str | Path, units: Iterable[tuple[str, float]]) -> None:
    """Delete the certificates of the (base, sigma) units `units` from every rank file of `run_dir`."""
    units = list(units)
    for _, store in _each_store(run_dir):
        for base, sigma in units:
            store.delete_certificates(base, sigma)


def delete_units(run_dir: str | Path, units: Iterable[tuple[str, str]]) -> None:
    """Delete the (defense, attack) blocks `units` from every rank file of `run_dir`."""
    units = list(units)
    for _, store in _each_store(run_dir):
        for defense, attack in units:
            store.delete_unit(defense, attack)


def clear(run_dir: str | Path) -> None:
    """Delete the records folder (the user asked to overwrite a run dir)."""
    shutil.rmtree(records_dir(run_dir), ignore_errors=True)


def open_run_dir(
    run_dir: str | Path,
    manifest: dict,
    *,
    config_yaml: str,
    section: str,
    things: str,
    base_what: str,
    delete: Callable[[Path, list[str]], None],
    resume: bool,
    overwrite: bool,
    rank: int,
    lock: bool = True,
) -> Path:
    """Create or reopen `run_dir` for `manifest` = {"base": fingerprint, "units": {key: fingerprint}}.

    A run dir whose manifest has another base fingerprint or another fingerprint for one of these
    units is refused with RunDirError (changing nothing), unless `overwrite`: then the changed units
    are deleted through `delete(run_dir, keys)` (everything when the base changed). `resume=False`
    starts over. Units of the old manifest that this run does not name are kept. Rank 0 writes
    `config.yaml` and `manifest.json`; every rank removes Lightning's stale `hpc_ckpt_*.ckpt`
    (left by a SIGUSR1 under SLURM: the nets come from their weights files and the records are
    what resumes, and Lightning's test() would otherwise load it) and then waits at a barrier.
    `section` ("benchmark", "certify") and `things` ("results", "certificates") word the errors.

    One writer per run dir: with `lock` (default) the launch's rank 0 first takes the run dir's lock
    (`advpure.results.lock.lock_run_dir`, held until the process ends or `release_run_dir`); a run
    dir held by another live run is refused with a one-line RunDirError naming its pid, host and the
    lock file, before anything is read or changed. `config.yaml` and `manifest.json` are written
    atomically (mode 0666 & ~umask); a filesystem error (read-only, no space left, permission
    denied) is a one-line StorageError naming the file.
    """
    run_dir = Path(run_dir)
    if lock:
        lock_run_dir(run_dir, rank=rank, section=section)
    manifest_path = run_dir / "manifest.json"
    units = manifest["units"]
    if manifest_path.exists():
        try:
            with storage_errors(manifest_path, "run manifest", "read"):
                text = manifest_path.read_text()
            old = json.loads(text)
            old_base, old_units = old["base"], old["units"]
        except (ValueError, KeyError, TypeError):
            raise RunDirError(
                f"{manifest_path} is corrupt; delete the run dir or use {section}.overwrite=true"
            ) from None
        changed = [k for k in units if k in old_units and old_units[k] != units[k]]
        base_changed = old_base != manifest["base"]
        if (changed or base_changed) and not overwrite:
            what = [f"the base settings ({base_what})"] if base_changed else []
            raise RunDirError(
                f"{run_dir} holds {things} made with other settings ({'; '.join([*what, *changed][:4])}); "
                f"use {section}.overwrite=true to discard those, or another {section}.run_dir"
            )
        if base_changed or not resume:
            if rank == 0:
                clear(run_dir)
            old_units = {}
        elif changed and rank == 0:
            delete(run_dir, changed)
        manifest = {**manifest, "units": {**old_units, **units}}
    with storage_errors(run_dir, "run dir"):
        for stale in run_dir.glob("hpc_ckpt_*.ckpt"):
            stale.unlink(missing_ok=True)
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        write_text_atomic(run_dir / "config.yaml", config_yaml, what="run config")
        write_text_atomic(manifest_path, json.dumps(manifest, indent=1, sort_keys=True), what="run manifest")
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return run_dir
