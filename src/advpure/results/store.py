"""Crash-safe per-process storage of per-sample results (SQLite, one file per rank).

Why per-sample records in SQLite: every accuracy the benchmark reports is recomputed from these
rows, so nothing is ever reduced by hand across processes, a preempted run resumes batch by batch,
and a 2-rank run can be checked against a 1-rank run sample by sample.

Why one file per rank: SQLite serialises writers per file; separate files mean ranks never wait on
each other and never share a lock over a network filesystem. Readers merge the files
(`load_records` & co.) and deduplicate.

Filesystem errors: a store that cannot be written (read-only file system or folder, no space left,
quota, permission denied) raises a one-line `StorageError` naming the file and the reason
(`advpure.core.fsio`); the failed transaction is rolled back, so every batch committed before it
stays readable and a rerun resumes from it.

Durability: the rollback journal (`journal_mode=DELETE`, which also works on NFS, unlike WAL) with
`synchronous=FULL`. `write_batch` writes the records, traces, examples *and* the batch's "done"
marker in one transaction: after it returns, the batch survives `kill -9` and power loss; if the
process dies before it returns, the next open rolls the half-written transaction back and the
batch is simply redone.

Layout of a run directory::

    <run_dir>/records/rank0.sqlite, rank1.sqlite, ...

Formats (all values are plain Python / numpy):

* a record is `Record(defense, attack, protocol, merge, idx, value)`; `write_batch` takes the
  records of one (defense, attack) batch either as these 6-tuples (defense and attack must match
  the call) or as 4-tuples `(protocol, merge, idx, value)`;
* traces are `{idx: 1-D array of the attack loss per iteration}` (stored as float32);
* examples are `[(idx, clean, adversarial, purified), ...]`, each image a float array in [0, 1]
  of shape (C, H, W) (stored as float32).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from advpure.core.errors import RunDirError
from advpure.core.fsio import storage_error, storage_errors
from advpure.purify.merge import MERGE_RULES

NATURAL = "natural"  # the attack name of clean-accuracy records

SCHEMA_VERSION = 2  # stored as PRAGMA user_version; bump when the tables change
# v2 added `stats` (per-sample diagnostics) and `certificates`; a v1 file gains them on open

_TABLES = {
    "records": (
        "CREATE TABLE records (defense TEXT NOT NULL, attack TEXT NOT NULL, protocol TEXT NOT NULL, "
        "merge TEXT NOT NULL, idx INTEGER NOT NULL, value REAL NOT NULL, "
        "PRIMARY KEY (defense, attack, protocol, merge, idx))",
        ("defense", "attack", "protocol", "merge", "idx", "value"),
    ),
    "batches": (
        "CREATE TABLE batches (defense TEXT NOT NULL, attack TEXT NOT NULL, batch INTEGER NOT NULL, "
        "first_idx INTEGER NOT NULL, n INTEGER NOT NULL, score_evals INTEGER NOT NULL, "
        "seconds REAL NOT NULL, PRIMARY KEY (defense, attack, batch))",
        ("defense", "attack", "batch", "first_idx", "n", "score_evals", "seconds"),
    ),
    "traces": (
        "CREATE TABLE traces (defense TEXT NOT NULL, attack TEXT NOT NULL, idx INTEGER NOT NULL, "
        "losses BLOB NOT NULL, PRIMARY KEY (defense, attack, idx))",
        ("defense", "attack", "idx", "losses"),
    ),
    "examples": (
        "CREATE TABLE examples (defense TEXT NOT NULL, attack TEXT NOT NULL, idx INTEGER NOT NULL, "
        "clean BLOB NOT NULL, adversarial BLOB NOT NULL, purified BLOB NOT NULL, shape TEXT NOT NULL, "
        "PRIMARY KEY (defense, attack, idx))",
        ("defense", "attack", "idx", "clean", "adversarial", "purified", "shape"),
    ),
    "meta": (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)",
        ("key", "value"),
    ),
    "stats": (
        "CREATE TABLE stats (defense TEXT NOT NULL, attack TEXT NOT NULL, idx INTEGER NOT NULL, "
        "name TEXT NOT NULL, value REAL NOT NULL, PRIMARY KEY (defense, attack, idx, name))",
        ("defense", "attack", "idx", "name", "value"),
    ),
    "certificates": (
        "CREATE TABLE certificates (base TEXT NOT NULL, sigma REAL NOT NULL, idx INTEGER NOT NULL, "
        "label INTEGER NOT NULL, prediction INTEGER NOT NULL, p_a REAL NOT NULL, radius REAL NOT NULL, "
        "abstained INTEGER NOT NULL, n0 INTEGER NOT NULL, n INTEGER NOT NULL, alpha REAL NOT NULL, "
        "counts0 BLOB NOT NULL, counts BLOB NOT NULL, predict INTEGER NOT NULL, "
        "predict_pvalue REAL NOT NULL, seconds REAL NOT NULL, PRIMARY KEY (base, sigma, idx))",
        (
            "base",
            "sigma",
            "idx",
            "label",
            "prediction",
            "p_a",
            "radius",
            "abstained",
            "n0",
            "n",
            "alpha",
            "counts0",
            "counts",
            "predict",
            "predict_pvalue",
            "seconds",
        ),
    ),
}
_ADDED_IN_V2 = ("stats", "certificates")


class Record(NamedTuple):
    defense: str
    attack: str
    protocol: str
    merge: str
    idx: int
    value: float

    @property
    def key(self) -> tuple[str, str, str, str, int]:
        return (self.defense, self.attack, self.protocol, self.merge, self.idx)


class Batch(NamedTuple):
    """The "done" marker of one attacked batch, with what it cost."""

    defense: str
    attack: str
    batch: int
    first_idx: int
    n: int
    score_evals: int
    seconds: float


# per-sample stats (the `stats` table) written with the examples: the true class and the class the
# classifier gives the stored purified image (`Example.label` / `.prediction`, joined by the report)
EXAMPLE_LABEL, EXAMPLE_PREDICTION = "example_label", "example_prediction"


class Example(NamedTuple):
    defense: str
    attack: str
    idx: int
    clean: np.ndarray  # (C, H, W) float32 in [0, 1]
    adversarial: np.ndarray
    purified: np.ndarray  # one purification draw of `adversarial`
    label: int | None = None  # true class (stats EXAMPLE_LABEL)
    prediction: int | None = None  # the classifier's class of `purified` (stats EXAMPLE_PREDICTION)


def _corrupt(path: Path, why: str) -> RunDirError:
    return RunDirError(f"corrupt results store {path} ({why}); delete it or use a new run dir")


def _blob(array: Any) -> bytes:
    return np.ascontiguousarray(_as_numpy(array), dtype=np.float32).tobytes()


def _as_numpy(x: Any) -> np.ndarray:
    """numpy view of an array-like; torch tensors are detached and moved to the CPU first."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class RecordStore:
    """One process's results file. Use as a context manager, or call `close()`.

    Opening validates the file: anything that is not a SQLite database of this schema raises
    `RunDirError` naming the file, instead of a sqlite3 traceback deep inside a benchmark.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves so a transaction is exactly
            # one batch; timeout: a reader merging files may briefly hold the lock.
            self._conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        except sqlite3.Error as e:
            raise storage_error(e, self.path, "results store", "open") from None
        try:
            self._conn.execute("PRAGMA journal_mode=DELETE")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._init_schema()
        except sqlite3.OperationalError as e:  # read-only, disk full, locked: not a corrupt file
            self._conn.close()
            raise storage_error(e, self.path, "results store", "open") from None
        except sqlite3.DatabaseError as e:
            self._conn.close()
            raise _corrupt(self.path, str(e)) from None
        except RunDirError:
            self._conn.close()
            raise

    @classmethod
    def for_rank(cls, run_dir: str | Path, rank: int) -> RecordStore:
        """The file of process `rank` inside `run_dir` (the records/ folder is created)."""
        folder = records_dir(run_dir)
        with storage_errors(folder, "records folder", "create"):
            folder.mkdir(parents=True, exist_ok=True)
        return cls(folder / f"rank{int(rank)}.sqlite")

    # --- schema -------------------------------------------------------------------------------
    def _init_schema(self) -> None:
        conn = self._conn
        # quick_check reads every page: it catches truncated or overwritten files at open time,
        # where the message can still name the file (cheap: stores are a few MB at most).
        problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise _corrupt(self.path, "; ".join(problems[:2]))
        version, tables = self._schema_state()
        if version == 0 and not tables:  # a new (or empty) file
            conn.execute("BEGIN IMMEDIATE")
            try:
                version, tables = self._schema_state()  # another process may have just created it
                if version == 0 and not tables:
                    for sql, _ in _TABLES.values():
                        conn.execute(sql)
                    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                    version = SCHEMA_VERSION
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        if version == 1:  # add the tables of v2; the v1 tables are unchanged
            conn.execute("BEGIN IMMEDIATE")
            try:
                for name in _ADDED_IN_V2:
                    if name not in self._schema_state()[1]:
                        conn.execute(_TABLES[name][0])
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                conn.execute("COMMIT")
                version = SCHEMA_VERSION
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        if version != SCHEMA_VERSION:
            raise _corrupt(self.path, f"schema version {version}, expected {SCHEMA_VERSION}")
        for name, (_, columns) in _TABLES.items():
            found = tuple(row[1] for row in conn.execute(f"PRAGMA table_info({name})"))
            if found != columns:
                raise _corrupt(self.path, f"table '{name}' has columns {found or 'none'}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT): anything raised inside rolls it back
        (nothing of it is kept) and a filesystem error becomes a one-line StorageError."""
        conn = self._conn
        with self._writing():
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # sqlite may already have rolled back (e.g. disk full)
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                raise

    def _writing(self):
        """Context: a sqlite3.OperationalError / OSError while writing is a one-line StorageError."""
        return storage_errors(self.path, "results store")

    def _schema_state(self) -> tuple[int, set[str]]:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        return version, tables

    # --- writing ------------------------------------------------------------------------------
    def write_batch(
        self,
        defense: str,
        attack: str,
        batch: int,
        first_idx: int,
        n: int,
        records: Iterable[Sequence[Any]],
        *,
        score_evals: int = 0,
        seconds: float = 0.0,
        traces: Mapping[int, Any] | None = None,
        examples: Iterable[Sequence[Any]] | None = None,
        stats: Mapping[str, Mapping[int, float]] | None = None,
    ) -> None:
        """Store everything about one batch and mark it done, in ONE transaction.

        A batch covers the test images `first_idx <= idx < first_idx + n` (contiguous: shard
        the test set by batches, not by interleaved indices); records outside raise ValueError.
        `records`: `Record`s / 6-tuples `(defense, attack, protocol, merge, idx, value)` whose
        defense and attack equal the arguments, or 4-tuples `(protocol, merge, idx, value)`.
        `traces`: `{idx: 1-D loss per attack iteration}`. `examples`: `[(idx, clean, adv,
        purified)]` with (C, H, W) images in [0, 1]. Arrays may be numpy or torch.

        Writing a record that already exists with the same value is allowed (a batch redone
        after a crash); a different value raises `RunDirError`: two runs disagree about a sample.
        If anything raises (including the `records` iterable itself), nothing of the batch is kept.
        """
        with self._transaction() as conn:
            rows = [self._record_row(defense, attack, r) for r in records]
            outside = [r[4] for r in rows if not first_idx <= r[4] < first_idx + n]
            if outside:
                # batch_records() finds a batch's records by this range: keep the convention.
                raise ValueError(
                    f"record idx {outside[0]} outside batch {batch} = [{first_idx}, {first_idx + n})"
                )
            before = conn.total_changes
            conn.executemany("INSERT OR IGNORE INTO records VALUES (?, ?, ?, ?, ?, ?)", rows)
            if conn.total_changes - before != len(rows):
                self._check_redone(rows)
            if traces:
                conn.executemany(
                    "INSERT OR REPLACE INTO traces VALUES (?, ?, ?, ?)",
                    [(defense, attack, int(i), _blob(_as_numpy(t).reshape(-1))) for i, t in traces.items()],
                )
            for name, values in (stats or {}).items():
                conn.executemany(
                    "INSERT OR REPLACE INTO stats VALUES (?, ?, ?, ?, ?)",
                    [(defense, attack, int(i), name, float(v)) for i, v in values.items()],
                )
            for idx, clean, adv, pur in examples or ():
                arrays = [_as_numpy(a) for a in (clean, adv, pur)]
                shape = arrays[0].shape
                if len(shape) != 3 or any(a.shape != shape for a in arrays):
                    raise ValueError(f"example {idx}: images must share one (C, H, W) shape")
                conn.execute(
                    "INSERT OR REPLACE INTO examples VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (defense, attack, int(idx), *[_blob(a) for a in arrays], ",".join(map(str, shape))),
                )
            conn.execute(
                "INSERT OR REPLACE INTO batches VALUES (?, ?, ?, ?, ?, ?, ?)",
                (defense, attack, int(batch), int(first_idx), int(n), int(score_evals), float(seconds)),
            )

    @staticmethod
    def _record_row(defense: str, attack: str, r: Sequence[Any]) -> tuple:
        if len(r) == 6:
            if (r[0], r[1]) != (defense, attack):
                raise ValueError(f"record {tuple(r)} written under ({defense!r}, {attack!r})")
            r = r[2:]
        if len(r) != 4:
            raise ValueError(f"a record is (protocol, merge, idx, value), got {tuple(r)!r}")
        protocol, merge, idx, value = r
        if not isinstance(protocol, str) or not protocol:  # names are checked at config time
            raise ValueError(f"a record's protocol must be a non-empty name, got {protocol!r}")
        if merge not in MERGE_RULES:
            raise ValueError(f"unknown merge {merge!r}; allowed: {', '.join(MERGE_RULES)}")
        value = float(value)
        if not (0.0 <= value <= 1.0):  # also rejects NaN
            raise ValueError(f"record value must be in [0, 1], got {value} for sample {idx}")
        return (defense, attack, protocol, merge, int(idx), value)

    def _check_redone(self, rows: list[tuple]) -> None:
        """Some keys already existed (a redone batch): their stored values must agree."""
        for row in rows:
            stored = self._conn.execute(
                "SELECT value FROM records WHERE defense=? AND attack=? AND protocol=? AND merge=? AND idx=?",
                row[:5],
            ).fetchone()
            if stored is not None and stored[0] != row[5]:
                raise RunDirError(
                    f"conflicting record {row[:5]} in {self.path}: stored {stored[0]}, new {row[5]}"
                )

    def delete_unit(self, defense: str, attack: str) -> None:
        """Remove every row of one (defense, attack) block (records, markers, traces, examples),
        in one transaction: the block is then recomputed, the other blocks are kept."""
        with self._transaction() as conn:
            for table in ("records", "batches", "traces", "examples", "stats"):
                conn.execute(f"DELETE FROM {table} WHERE defense=? AND attack=?", (defense, attack))

    def set_meta(self, key: str, value: Any) -> None:
        """Store a JSON-serialisable value (committed at once)."""
        with self._writing():
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    # --- reading ------------------------------------------------------------------------------
    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """All rows of a read; damage found only now (a page past the checks) names the file."""
        try:
            return self._conn.execute(sql, tuple(params)).fetchall()
        except sqlite3.OperationalError as e:  # unreadable (I/O error, locked), not corrupt
            raise storage_error(e, self.path, "results store", "read") from None
        except sqlite3.DatabaseError as e:
            raise _corrupt(self.path, str(e)) from None

    def get_meta(self, key: str, default: Any = None) -> Any:
        rows = self._query("SELECT value FROM meta WHERE key=?", (key,))
        return json.loads(rows[0][0]) if rows else default

    def is_done(self, defense: str, attack: str, batch: int) -> bool:
        sql = "SELECT 1 FROM batches WHERE defense=? AND attack=? AND batch=?"
        return bool(self._query(sql, (defense, attack, int(batch))))

    def batch_records(self, defense: str, attack: str, batch: int) -> list[Record]:
        """The records of a finished batch (empty if not done), to re-feed metrics on resume."""
        marker = self._query(
            "SELECT first_idx, n FROM batches WHERE defense=? AND attack=? AND batch=?",
            (defense, attack, int(batch)),
        )
        if not marker:
            return []
        # A batch is identified by its index range (write_batch enforces it).
        first, n = marker[0]
        rows = self._query(
            "SELECT * FROM records WHERE defense=? AND attack=? AND idx>=? AND idx<? "
            "ORDER BY protocol, merge, idx",
            (defense, attack, first, first + n),
        )
        return [Record(*row) for row in rows]

    def records(self) -> list[Record]:
        return [Record(*row) for row in self._query("SELECT * FROM records")]

    def batches(self) -> list[Batch]:
        return [Batch(*row) for row in self._query("SELECT * FROM batches")]

    def traces(self) -> list[tuple[str, str, int, np.ndarray]]:
        return [
            (d, a, i, np.frombuffer(blob, dtype=np.float32).copy())
            for d, a, i, blob in self._query("SELECT * FROM traces")
        ]

    def stats(self) -> list[tuple[str, str, int, str, float]]:
        return [tuple(r) for r in self._query("SELECT * FROM stats")]

    def write_certificates(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Store per-image certificates (`certificates` columns; counts as int64 arrays) in one
        transaction; an image already stored with the same (base, sigma, idx) is replaced."""
        cols = _TABLES["certificates"][1]
        data = []
        for r in rows:
            row = dict(r)
            for k in ("counts0", "counts"):
                row[k] = np.ascontiguousarray(_as_numpy(row[k]), dtype=np.int64).tobytes()
            data.append(tuple(row[c] for c in cols))
        with self._transaction() as conn:
            conn.executemany(
                f"INSERT OR REPLACE INTO certificates VALUES ({', '.join('?' * len(cols))})", data
            )

    def delete_certificates(self, base: str, sigma: float) -> None:
        """Remove every certificate of one (base, sigma) unit, in one transaction (it is then recomputed)."""
        with self._transaction() as conn:
            conn.execute("DELETE FROM certificates WHERE base=? AND sigma=?", (base, float(sigma)))

    def certificates(self) -> list[dict[str, Any]]:
        cols = _TABLES["certificates"][1]
        out = []
        for row in self._query("SELECT * FROM certificates"):
            r = dict(zip(cols, row))
            for k in ("counts0", "counts"):
                r[k] = np.frombuffer(r[k], dtype=np.int64).copy()
            out.append(r)
        return out

    def examples(self) -> list[Example]:
        out = []
        for d, a, i, clean, adv, pur, shape in self._query("SELECT * FROM examples"):
            dims = tuple(int(s) for s in shape.split(","))
            images = [np.frombuffer(b, np.float32).reshape(dims).copy() for b in (clean, adv, pur)]
            out.append(Example(d, a, i, *images))
        return out

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> RecordStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def records_dir(run_dir: str | Path) -> Path:
    """`<run_dir>/records`, where every rank's store file lives."""
    return Path(run_dir) / "records"
