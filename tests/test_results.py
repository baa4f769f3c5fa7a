"""Results layer: crash-safe record store, merging ranks, statistics, protocols, tables, plots."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3

import numpy as np
import pytest
import torch
from PIL import Image

from advpure.core.errors import RunDirError
from advpure.results import (
    CITED_HEADING,
    Example,
    Record,
    RecordStore,
    accuracy,
    check_consistency,
    clear,
    load_batches,
    load_examples,
    load_records,
    load_traces,
    plot_image_grid,
    plot_loss_curves,
    plot_robust_vs_eps,
    protocol_records,
    read_csv,
    read_json,
    records_for,
    summarize,
    to_console,
    to_csv,
    to_json,
    to_markdown,
    wilson,
)
from advpure.results.plots import DPI, grid_inches


def _batch_records(first: int, n: int, value: float = 1.0) -> list[tuple]:
    return [("single", "softmax", i, value) for i in range(first, first + n)]


# --- store ------------------------------------------------------------------------------------
def test_store_round_trip(tmp_path):
    clean = np.random.default_rng(0).random((1, 4, 5)).astype(np.float32)
    adv, pur = clean * 0.5, clean * 0.25
    recs = [Record("adp", "pgd", "single", "softmax", 0, 1.0), ("worst_of_n", "vote", 1, 0.0)]
    with RecordStore.for_rank(tmp_path, 3) as store:
        store.write_batch(
            "adp",
            "pgd",
            0,
            0,
            2,
            recs,
            score_evals=1234,
            seconds=2.5,
            traces={0: np.array([0.1, 0.5, 0.9]), 1: torch.tensor([1.0, 2.0])},
            examples=[(1, clean, adv, pur)],
        )
        store.set_meta("config_hash", {"h": "abc", "n": 3})
        assert store.is_done("adp", "pgd", 0)
        assert not store.is_done("adp", "pgd", 1) and not store.is_done("adp", "other", 0)
    assert (tmp_path / "records" / "rank3.sqlite").is_file()

    with RecordStore.for_rank(tmp_path, 3) as store:  # reopened: everything is still there
        assert store.get_meta("config_hash") == {"h": "abc", "n": 3}
        assert store.get_meta("missing", 7) == 7
        assert store.batch_records("adp", "pgd", 0) == [
            Record("adp", "pgd", "single", "softmax", 0, 1.0),
            Record("adp", "pgd", "worst_of_n", "vote", 1, 0.0),
        ]
        assert store.batch_records("adp", "pgd", 5) == []
    assert load_records(tmp_path) == sorted(
        [
            Record("adp", "pgd", "single", "softmax", 0, 1.0),
            Record("adp", "pgd", "worst_of_n", "vote", 1, 0.0),
        ]
    )
    (batch,) = load_batches(tmp_path)
    assert (batch.first_idx, batch.n, batch.score_evals, batch.seconds) == (0, 2, 1234, 2.5)
    traces = load_traces(tmp_path)[("adp", "pgd")]
    np.testing.assert_allclose(traces[0], [0.1, 0.5, 0.9], rtol=1e-6)
    assert traces[0].dtype == np.float32 and traces[1].tolist() == [1.0, 2.0]
    (ex,) = load_examples(tmp_path)
    assert (ex.defense, ex.attack, ex.idx) == ("adp", "pgd", 1)
    np.testing.assert_array_equal(ex.clean, clean)
    np.testing.assert_array_equal(ex.purified, pur)

    clear(tmp_path)
    assert load_records(tmp_path) == [] and not (tmp_path / "records").exists()


def test_write_batch_rejects_bad_records(tmp_path):
    with RecordStore.for_rank(tmp_path, 0) as store:
        for bad in (
            [("single", "softmax", 0, 1.5)],  # value outside [0, 1]
            [("single", "softmax", 0, float("nan"))],
            [("", "softmax", 0, 1.0)],  # no protocol name (names are checked at config time)
            [("single", "median", 0, 1.0)],  # unknown merge
            [("single", "softmax", 9, 1.0)],  # outside the batch's index range
            [Record("other", "pgd", "single", "softmax", 0, 1.0)],  # another defense
        ):
            with pytest.raises(ValueError):
                store.write_batch("adp", "pgd", 0, 0, 2, bad)
        assert not store.is_done("adp", "pgd", 0)
    assert load_records(tmp_path) == []


def _write_and_die(run_dir, mid_transaction: bool) -> None:
    """Child process: write a batch, then die by SIGKILL (no close, no atexit, no flush)."""
    store = RecordStore.for_rank(run_dir, 0)
    if not mid_transaction:
        store.write_batch("adp", "pgd", 1, 10, 5, _batch_records(10, 5), score_evals=7)
        os.kill(os.getpid(), signal.SIGKILL)

    image = np.zeros((1, 2, 2))

    def examples_then_crash():  # consumed after the records and traces were inserted
        yield (10, image, image, image)
        os.kill(os.getpid(), signal.SIGKILL)  # inside write_batch's open transaction
        yield (11, image, image, image)

    store.write_batch(
        "adp", "pgd", 1, 10, 5, _batch_records(10, 5), traces={10: np.ones(3)}, examples=examples_then_crash()
    )


@pytest.mark.parametrize("mid_transaction", [False, True])
def test_kill9_keeps_exactly_the_committed_batches(tmp_path, mid_transaction):
    with RecordStore.for_rank(tmp_path, 0) as store:
        store.write_batch("adp", "pgd", 0, 0, 10, _batch_records(0, 10))
    child = multiprocessing.get_context("fork").Process(
        target=_write_and_die, args=(tmp_path, mid_transaction)
    )
    child.start()
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    if mid_transaction:  # the crash left a hot journal: the half-written batch is on disk
        assert (tmp_path / "records" / "rank0.sqlite-journal").exists()

    with RecordStore.for_rank(tmp_path, 0) as store:
        assert store.is_done("adp", "pgd", 0)
        assert store.is_done("adp", "pgd", 1) is not mid_transaction
        assert len(store.batch_records("adp", "pgd", 1)) == (0 if mid_transaction else 5)
    assert sorted(r.idx for r in load_records(tmp_path)) == list(range(10 if mid_transaction else 15))
    assert load_traces(tmp_path) == {} and load_examples(tmp_path) == []


def test_failed_transaction_leaves_nothing(tmp_path):
    def records_then_fail():
        yield from _batch_records(0, 3)
        raise RuntimeError("attack crashed")

    with RecordStore.for_rank(tmp_path, 0) as store:
        with pytest.raises(RuntimeError):
            store.write_batch("adp", "pgd", 0, 0, 5, records_then_fail(), traces={0: np.ones(3)})
        assert not store.is_done("adp", "pgd", 0)
        assert store.batch_records("adp", "pgd", 0) == []
        store.write_batch("adp", "pgd", 0, 0, 5, _batch_records(0, 5))  # still usable afterwards
    assert len(load_records(tmp_path)) == 5 and load_traces(tmp_path) == {}


def test_ranks_merge_to_deduplicated_union(tmp_path):
    with RecordStore.for_rank(tmp_path, 0) as r0, RecordStore.for_rank(tmp_path, 1) as r1:
        r0.write_batch("adp", "pgd", 0, 0, 4, _batch_records(0, 4), score_evals=40)
        r1.write_batch("adp", "pgd", 0, 0, 4, _batch_records(0, 4), score_evals=41)  # redone
        r1.write_batch("adp", "pgd", 1, 4, 4, _batch_records(4, 4, value=0.0), score_evals=50)
        r1.write_batch("adp", "pgd", 1, 4, 4, _batch_records(4, 4, value=0.0))  # redone in one file
    records = load_records(tmp_path)
    assert [(r.idx, r.value) for r in records] == [(i, 1.0) for i in range(4)] + [
        (i, 0.0) for i in range(4, 8)
    ]
    batches = load_batches(tmp_path)
    assert [(b.batch, b.score_evals) for b in batches] == [(0, 40), (1, 0)]  # lowest rank's copy, not summed

    with RecordStore.for_rank(tmp_path, 2) as r2:
        r2.write_batch("adp", "pgd", 0, 0, 4, _batch_records(0, 4, value=0.0))
    with pytest.raises(RunDirError, match=r"conflicting record \('adp', 'pgd', 'single', 'softmax', 0\)"):
        load_records(tmp_path)
    with RecordStore.for_rank(tmp_path, 2) as r2, pytest.raises(RunDirError, match="conflicting record"):
        r2.write_batch("adp", "pgd", 0, 0, 4, _batch_records(0, 4, value=1.0))


def test_corrupt_stores_raise_rundir_error(tmp_path):
    folder = tmp_path / "records"
    folder.mkdir()
    garbage = folder / "rank0.sqlite"
    garbage.write_bytes(np.random.default_rng(0).bytes(8192))
    with pytest.raises(RunDirError, match=r"corrupt results store .*rank0\.sqlite.*delete it"):
        RecordStore(garbage)
    with pytest.raises(RunDirError, match="rank0.sqlite"):
        load_records(tmp_path)
    garbage.unlink()

    good = tmp_path / "good.sqlite"
    with RecordStore(good) as store:
        for b in range(4):
            store.write_batch("adp", "pgd", b, 300 * b, 300, _batch_records(300 * b, 300))
    data = good.read_bytes()
    truncated = folder / "rank1.sqlite"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(RunDirError, match=r"corrupt results store .*rank1\.sqlite"):
        load_records(tmp_path)
    truncated.unlink()

    other = folder / "rank2.sqlite"  # a valid SQLite file of another schema
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE records (a, b)")
    with pytest.raises(RunDirError, match=r"corrupt results store .*rank2\.sqlite"):
        load_records(tmp_path)


# --- statistics -------------------------------------------------------------------------------
def test_wilson_known_values_and_monotonic():
    assert wilson(0, 10)[0] == 0.0 and wilson(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(100, 100)[0] == pytest.approx(0.9630, abs=1e-4) and wilson(100, 100)[1] == 1.0
    assert wilson(0, 0) == (0.0, 1.0)
    bounds = [wilson(k, 50) for k in range(51)]
    assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(bounds, bounds[1:]))
    assert all(lo <= k / 50 <= hi for k, (lo, hi) in enumerate(bounds))
    assert wilson(5, 10, z=2.5758)[0] < wilson(5, 10)[0]  # 99% is wider

    acc, lo, hi, n = accuracy([1, 0, 1, 1])
    assert (acc, n) == (0.75, 4) and (lo, hi) == wilson(3, 4)
    acc, lo, hi, n = accuracy(torch.tensor([0.5, 1.0, 0.25]))  # mean_of_n: k = sum of fractions
    assert acc == pytest.approx(1.75 / 3) and (lo, hi) == pytest.approx(wilson(1.75, 3))
    assert accuracy([])[1:] == (0.0, 1.0, 0)


# --- protocols --------------------------------------------------------------------------------
def test_protocol_records_by_hand():
    t, f = True, False
    final = torch.tensor([[t, t, f, f, t], [t, f, f, t, t], [t, t, f, t, f]])  # N=3 draws, B=5
    path = torch.tensor([[t, t, t, t, t], [t, f, t, t, t]])  # iterates 0 and 1
    four = ["single", "worst_of_n", "mean_of_n", "ever_broken"]
    out = protocol_records(final, path, four)
    assert out["single"].tolist() == [t, t, f, f, t]
    assert out["worst_of_n"].tolist() == [t, f, f, f, f]  # col 0 all correct, col 2 all wrong
    assert out["mean_of_n"].tolist() == pytest.approx([1.0, 2 / 3, 0.0, 2 / 3, 2 / 3])
    assert out["ever_broken"].tolist() == [t, f, f, f, t]  # col 1 broken at iterate 1
    assert "ever_broken" not in protocol_records(final, protocols=four)

    one = protocol_records(final[:1], torch.zeros(0, 5, dtype=torch.bool), four)  # N=1, no earlier iterate
    assert one["worst_of_n"].tolist() == one["single"].tolist() == one["ever_broken"].tolist()
    assert one["mean_of_n"].tolist() == one["single"].float().tolist()
    with pytest.raises(ValueError):
        protocol_records(final.float())
    with pytest.raises(ValueError):
        protocol_records(final, path[:, :3])

    recs = records_for("adp", "pgd", torch.tensor([10, 11, 12, 13, 14]), {"softmax": out, "vote": one})
    assert len(recs) == 5 * 4 * 2
    assert Record("adp", "pgd", "ever_broken", "softmax", 11, 0.0) in recs
    assert Record("adp", "pgd", "mean_of_n", "vote", 13, 0.0) in recs
    assert check_consistency(recs) == 10


def test_majority_of_n_and_its_floor():
    """DiffBreak's majority vote: robust when more than half of the N draws are correct (a tie is not);
    its floor is the same vote over the first N clean classifications, and it comes with the protocol."""
    from advpure.results.protocols import Observations, with_floors

    t, f = True, False
    final = torch.tensor([[t, t, f, f, t], [t, f, f, t, f], [t, t, f, t, f], [t, f, t, f, f]])  # N=4, B=5
    out = protocol_records(final, protocols=["single", "worst_of_n", "mean_of_n", "majority_of_n"])
    assert out["majority_of_n"].tolist() == [t, f, f, f, f]  # col 1 and col 3: 2 of 4, a tie
    assert out["majority_of_n"].tolist() != (out["mean_of_n"] >= 0.5).tolist()
    three = protocol_records(final[:3], protocols=["majority_of_n"])["majority_of_n"]
    assert three.tolist() == [t, t, f, t, f]  # 2 of 3 is a majority
    assert (
        protocol_records(final[:1], protocols=["majority_of_n"])["majority_of_n"].tolist()
        == final[0].tolist()
    )
    clean = torch.tensor([[t, f], [t, f], [f, t], [f, t], [f, t]])  # M = 5 rows; the floor reads N = 3
    floor = protocol_records(
        final, protocols=["majority_of_n_floor"], clean=Observations(clean, n=3, path_len=4)
    )
    assert floor["majority_of_n_floor"].tolist() == [t, f]
    assert with_floors(["single", "majority_of_n"]) == ["single", "majority_of_n", "majority_of_n_floor"]
    recs = records_for("d", "a", torch.arange(5), {"softmax": out})
    assert check_consistency(recs) == 5
    for bad in (
        [("d", "a", "mean_of_n", "vote", 7, 0.75), ("d", "a", "majority_of_n", "vote", 7, 0.0)],
        [("d", "a", "mean_of_n", "vote", 7, 0.5), ("d", "a", "majority_of_n", "vote", 7, 1.0)],
        [("d", "a", "worst_of_n", "vote", 7, 1.0), ("d", "a", "majority_of_n", "vote", 7, 0.0)],
    ):
        with pytest.raises(ValueError, match="majority_of_n"):
            check_consistency(bad)


def test_check_consistency_catches_violations():
    good = [
        ("d", "a", "single", "softmax", 0, 1.0),
        ("d", "a", "worst_of_n", "softmax", 0, 0.0),
        ("d", "a", "mean_of_n", "softmax", 0, 0.5),
        ("d", "a", "ever_broken", "softmax", 0, 1.0),
    ]
    assert check_consistency(good) == 1
    for bad in (
        [("d", "a", "single", "vote", 7, 0.0), ("d", "a", "worst_of_n", "vote", 7, 1.0)],
        [("d", "a", "single", "vote", 7, 0.0), ("d", "a", "ever_broken", "vote", 7, 1.0)],
        [("d", "a", "worst_of_n", "vote", 7, 1.0), ("d", "a", "mean_of_n", "vote", 7, 0.5)],
        [("d", "a", "worst_of_n", "vote", 7, 0.0), ("d", "a", "mean_of_n", "vote", 7, 1.0)],
        [("d", "a", "single", "vote", 7, 1.0), ("d", "a", "mean_of_n", "vote", 7, 0.0)],
        [("d", "a", "mean_of_n", "vote", 7, 1.2)],
    ):
        with pytest.raises(ValueError, match="defense=d attack=a merge=vote idx=7"):
            check_consistency(good + bad)


# --- tables -----------------------------------------------------------------------------------
def _hand_records() -> tuple[list[Record], list[tuple]]:
    recs = [Record("adp", "natural", "single", "softmax", i, v) for i, v in enumerate([1, 1, 1, 0, 1, 0])]
    columns = {  # images 0..4 attacked; image 5 only has a natural record
        "single": [1, 0, 1, 0, 1],
        "worst_of_n": [1, 0, 0, 0, 1],
        "mean_of_n": [1, 0.5, 0.5, 0, 1],
        "ever_broken": [1, 0, 0, 0, 0],
    }
    recs += [
        Record("adp", "pgd", p, "softmax", i, float(v))
        for p, vals in columns.items()
        for i, v in enumerate(vals)
    ]
    recs += [Record("adp", "pgd", "single", "vote", i, 0.0) for i in range(5)]
    batches = [
        ("adp", "pgd", 0, 0, 3, 300, 3.0),
        ("adp", "pgd", 1, 3, 2, 250, 1.0),
        ("adp", "natural", 0, 0, 6, 60, 0.6),
    ]
    return recs, batches


def test_summarize_matches_hand_computation():
    recs, batches = _hand_records()
    rows = summarize(recs, batches, labels={"adp": "ADP σ=0.25"})
    assert [(r["defense"], r["attack"], r["merge"]) for r in rows] == [
        ("adp", "natural", "softmax"),
        ("adp", "pgd", "softmax"),
        ("adp", "pgd", "vote"),
    ]
    nat, pgd, vote = rows
    assert nat["single"] == pytest.approx(4 / 6) and nat["natural"] == pytest.approx(4 / 6) and nat["n"] == 6
    assert pgd["defense_label"] == "ADP σ=0.25" and pgd["attack_label"] == "pgd"
    assert pgd["n"] == 5 and pgd["natural_n"] == 5
    assert pgd["natural"] == pytest.approx(4 / 5)  # only the attacked images 0..4, not 4/6
    assert pgd["single"] == pytest.approx(0.6)
    assert (pgd["single_lo"], pgd["single_hi"]) == pytest.approx(wilson(3, 5))
    assert pgd["worst_of_n"] == pytest.approx(0.4)
    assert pgd["mean_of_n"] == pytest.approx(0.6)
    assert pgd["ever_broken"] == pytest.approx(0.2)
    assert pgd["score_evals_per_img"] == pytest.approx(550 / 5)
    assert pgd["seconds_per_img"] == pytest.approx(4.0 / 5)
    assert nat["score_evals_per_img"] == pytest.approx(10.0)
    assert vote["single"] == 0.0 and vote["natural"] is None and vote["worst_of_n"] is None
    assert summarize(recs)[1]["score_evals_per_img"] is None  # no batch markers, no cost


def test_markdown_console_csv_json(tmp_path):
    recs, batches = _hand_records()
    rows = summarize(recs, batches)
    header = ["FMNIST, first 6 test images, eps=0.1", "ADP sigma=0.25, S=10, T=10"]
    assert CITED_HEADING not in to_markdown(rows, header_lines=header)  # only the experiment's cited tables
    md = to_markdown(rows, header_lines=header, cited=["adp_paper", "adp_reevaluations"])
    measured, cited = md.split(CITED_HEADING)
    assert all(line in measured for line in header)
    # one column per protocol, in registration order, headed by its label
    assert "| Natural | Robust (single) | Worst-of-N | Mean-of-N | Ever broken |" in measured
    assert "| adp | pgd | 80.00 | 60.00 | 40.00 | 60.00 | 20.00 |" in measured
    assert "vote" not in measured.split("|---")[-1].split("\n", 1)[1]  # only the softmax rows
    assert "not measured here" in CITED_HEADING
    for cited_row in (
        "| ADP (σ=0.25), BPDA40+EOT | 86.14 | 70.01 | WRN-28-10 |",
        "| Gowal et al. 2020 | 89.48 | 64.08 | WRN-28-10 |",
        "| ADP (σ=0.1) | 93.09 | 85.45 |",
        "33.7 ± 0.54% robust",
    ):
        assert cited_row in cited and cited_row not in measured
    assert "| adp | pgd | – | 0.00 |" in to_markdown(rows, header_lines=[], merge="vote")

    console = to_console(rows)
    assert len({len(line) for line in console.splitlines()}) == 1  # fixed width
    assert "60.00" in console and "110" in console

    assert read_csv(to_csv(rows, tmp_path / "out" / "results.csv")) == rows
    back, meta = read_json(to_json(rows, tmp_path / "results.json", {"eps": 0.1, "n_images": 6}))
    assert back == rows and meta == {"eps": 0.1, "n_images": 6}


# --- plots ------------------------------------------------------------------------------------
def _png(path) -> Image.Image:
    img = Image.open(path)
    assert img.format == "PNG" and path.stat().st_size > 5000
    lo, hi = img.convert("L").getextrema()
    assert hi - lo > 100  # something was drawn
    return img


def test_plots_write_valid_pngs(tmp_path):
    points = [
        ("none", 0.05, 0.1, 0.05, 0.2),
        ("none", 0.1, 0.0, 0.0, 0.05),
        ("adp_s0.25", 0.1, 0.6, 0.5, 0.7),
        ("adp_s0.25", 0.05, 0.8, 0.7, 0.9),
    ]
    _png(plot_robust_vs_eps(points, tmp_path / "eps.png"))
    rng = np.random.default_rng(0)
    traces = {
        ("adp", "pgd"): {i: np.cumsum(rng.random(20)) for i in range(8)},
        ("none", "pgd"): {0: np.arange(12.0), 1: np.arange(20.0)},
    }  # unequal lengths
    _png(plot_loss_curves(traces, tmp_path / "plots" / "loss.png"))

    def examples(n: int, channels: int) -> list[Example]:
        out = []
        for i in range(n):
            clean = rng.random((channels, 28, 28)).astype(np.float32)
            adv = np.clip(clean + rng.uniform(-0.1, 0.1, clean.shape), 0, 1).astype(np.float32)
            out.append(Example("adp", "pgd", i, clean, adv, clean))
        return out

    grey = _png(plot_image_grid(examples(2, 1), tmp_path / "grid2.png"))
    rgb = _png(plot_image_grid(examples(4, 3), tmp_path / "grid4.png"))
    for img, rows in ((grey, 2), (rgb, 4)):  # one block: its header, then the rows
        w, h = grid_inches([rows])
        assert img.size == (round(w * DPI), round(h * DPI))
