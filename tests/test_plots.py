"""Plots a reader trusts at a glance (issue 21): every figure is rendered from small hand-made
records and checked on matplotlib's own layout (renderer extents): every text and legend inside
the figure, legends off the data, value labels clear of the error bars, the example grid's
headers, signed perturbation and classes, and the ADP paper's Fig. 2 arms as the table rows."""

from __future__ import annotations

import copy
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from advpure.data.sources import SPECS
from advpure.results import plots as P
from advpure.results.certify_report import certified_accuracy_figure
from advpure.results.labels import attack_label, defense_labels, fig2_arm
from advpure.results.report import ReportPlan, with_classes, write_report
from advpure.results.stats import accuracy
from advpure.results.store import EXAMPLE_LABEL, EXAMPLE_PREDICTION, Example, RecordStore, records_dir
from advpure.results.tables import summarize
from helpers.layout import (
    data_boxes,
    draw,
    error_bar_boxes,
    intersect,
    legend_clear_of_data,
    legend_outside_axes,
    legends,
    outside_figure,
    pairwise_overlaps,
    texts,
)

FIG2_ARMS = ["DSM + Det (ADP)", "DSM + Langevin", "ML-EBM + Det", "ML-EBM + Langevin (Hill et al.)"]
LONG_ATTACKS = [
    "BPDA10+EOT4",
    "Joint (full) 10+EOT4",
    "Joint (score) 10+EOT4",
    "PGD10-EOT2 (full gradient)",
    "PGD20 (classifier, blind)",
    "SPSA5 (N=8)",
    "standard_rand x3 restarts",
]


def _bars(groups, columns, accs, n=32):
    """(group, column, acc, lo, hi, n) with Wilson intervals of `round(acc * n)` of n correct."""
    out = []
    for g, row in zip(groups, accs):
        for c, a in zip(columns, row):
            k = round(a * n)
            acc, lo, hi, _ = accuracy([1.0] * k + [0.0] * (n - k))
            out.append((g, c, acc, lo, hi, n))
    return out


def _blob(i: int, channels: int = 1) -> np.ndarray:
    yy, xx = np.mgrid[0:28, 0:28]
    img = np.exp(-(((yy - 14) / (5 + i % 3)) ** 2 + ((xx - 14) / (4 + i % 4)) ** 2) / 2)
    return np.repeat(img[None], channels, 0).astype(np.float32)


def _examples(defense, attack, n, eps, rng, first=0):
    out = []
    for i in range(first, first + n):
        clean = _blob(i)
        adv = np.clip(clean + eps * np.sign(rng.standard_normal(clean.shape)), 0, 1).astype(np.float32)
        purified = np.clip(clean + 0.03 * rng.standard_normal(clean.shape), 0, 1).astype(np.float32)
        out.append(Example(defense, attack, i, clean, adv, purified, i % 10, (i + i % 2) % 10))
    return out


# --- labels: the paper's names, one place -------------------------------------------------------------
def test_fig2_arms_are_the_papers_names_in_table_rows_and_bars():
    """The four defenses of conf/experiment/fmnist_fig2.yaml read as Fig. 2's {DSM, ML-EBM} x {Det,
    Langevin}, with the same strings in the table rows and on the bar chart's ticks."""
    from advpure.config import compose as C
    from advpure.jobs.plan import build_plan

    plan = build_plan(C.load("fmnist_fig2"))
    purified = [d for d in plan.defenses if d != "none"]
    assert [plan.labels[d] for d in purified] == FIG2_ARMS
    assert not any("(ML)" in v for v in [*plan.labels.values(), *plan.descriptions.values()])
    records = [(d, "natural", "single", "softmax", i, float(i % 2)) for d in purified for i in range(4)]
    rows = sorted(summarize(records, labels=plan.labels), key=lambda r: purified.index(r["defense"]))
    assert [r["defense_label"] for r in rows] == FIG2_ARMS
    fig = P.defense_bars_figure([(r["defense_label"], "natural", r["single"], 0.1, 0.9, 4) for r in rows])
    draw(fig)
    ticks = [t.get_text().replace("\n", " ") for t in fig.axes[0].get_xticklabels()]
    assert ticks == FIG2_ARMS


def test_defense_labels_follow_the_block_not_the_experiment():
    """The arm comes from (kind, field); a lone arm keeps the purifier's label; two defenses of one
    arm are told apart by σ; the full description carries the settings."""
    from advpure.config.compose import defense_option

    blocks = dict(defense_option({"option": o}) for o in ("adp", "adp_ebm", "langevin", "langevin_ebm"))
    arms = {name: fig2_arm(b) for name, b in blocks.items()}
    assert sorted(arms.values()) == sorted(FIG2_ARMS)
    named = defense_labels(blocks)
    assert sorted(v.short for v in named.values()) == sorted(FIG2_ARMS)
    assert all(v.full.startswith(v.short) and "replicas" in v.full for v in named.values())
    _, adp = defense_option({"option": "adp"})
    sweep = defense_labels({"a": adp, "b": copy.deepcopy(adp)})
    assert sweep["a"].short.startswith("ADP σ=") and sweep["a"].short != sweep["b"].short
    narrow = copy.deepcopy(adp)
    narrow.sigma = 0.1
    _, langevin = defense_option({"option": "langevin"})
    mixed = defense_labels({"adp": adp, "narrow": narrow, "lg": langevin})
    assert [v.short for v in mixed.values()] == [
        "DSM + Det (ADP) σ=0.25",
        "DSM + Det (ADP) σ=0.1",
        "DSM + Langevin",
    ]


def test_attack_short_label_in_plots_full_description_kept():
    from advpure.attacks import attack_params

    label = attack_label(attack_params("standard_rand", iters=10, eot=2, n_target_classes=2))
    assert label.short == "standard_rand"
    assert label.full.startswith("standard_rand (APGD-CE, APGD-T-DLR x2; 10 it, EOT 2")
    bpda = attack_label(attack_params("pgd", gradient="bpda", iters=10, eot=4))
    assert bpda.short == bpda.full == "BPDA10+EOT4"


# --- curves --------------------------------------------------------------------------------------------
def test_loss_curves_long_legend_stands_outside_and_the_figure_grows():
    rng = np.random.default_rng(0)
    traces = {
        ("DSM + Det (ADP) σ=0.25", a): {
            i: np.cumsum(rng.random(10 + 5 * k)) for i in range(8 if k == 5 else 32)
        }
        for k, a in enumerate(LONG_ATTACKS)
    }
    traces[("Undefended", "PGD20 (classifier, blind)")] = {i: np.cumsum(rng.random(20)) for i in range(32)}
    fig = P.loss_curves_figure(traces)
    ax = fig.axes[0]
    assert outside_figure(fig) == []
    assert legend_outside_axes(fig, ax) and legend_clear_of_data(fig, ax)
    assert fig.get_size_inches()[0] > 7.5  # widened by the legend, the axes keep their width
    entries = [t.get_text() for t in legends(fig)[0].get_texts()]
    assert len(entries) == 8 and "DSM + Det (ADP) σ=0.25 / SPSA5 (N=8) (n=8)" in entries
    assert ax.get_window_extent().width > 350  # the data keep a readable width
    one_n = P.loss_curves_figure({k: dict(list(v.items())[:8]) for k, v in traces.items()})
    draw(one_n)
    assert "n = 8 images" in one_n.axes[0].get_ylabel()
    assert not any("(n=" in t.get_text() for t in legends(one_n)[0].get_texts())


def test_many_legend_entries_make_the_figure_taller():
    rng = np.random.default_rng(1)
    traces = {(f"defense {k}", f"attack with a long name {k}"): rng.random((4, 6)) for k in range(30)}
    fig = P.loss_curves_figure(traces)
    assert outside_figure(fig) == []
    assert fig.get_size_inches()[1] > 4.0


def test_robust_vs_eps_legend_off_the_data_and_units_in_labels():
    pts = [
        (d, e, max(0.0, b - 4 * e), max(0.0, b - 4 * e - 0.15), min(1.0, b - 4 * e + 0.12), 32)
        for d, b in (("Undefended", 0.9), ("ADP σ=0.1", 0.93), ("ADP σ=0.25", 0.88))
        for e in (0.0, 0.05, 0.1, 0.15, 0.2)
    ]
    fig = P.robust_vs_eps_figure(pts)
    ax = fig.axes[0]
    assert outside_figure(fig) == []
    assert legend_outside_axes(fig, ax)
    assert "%" in ax.get_ylabel() and "n = 32 images" in ax.get_ylabel()
    assert "ε" in ax.get_xlabel() and "[0, 1]" in ax.get_xlabel()


def test_certified_accuracy_legend_outside_and_n_in_the_y_label():
    rng = np.random.default_rng(2)
    units = [(b, s) for b in ("noisy", "denoised", "adp") for s in (0.25, 0.5)]
    records = [
        {
            "base": b,
            "sigma": s,
            "idx": i,
            "label": 1,
            "prediction": 1 if rng.random() < 0.8 else 0,
            "radius": float(rng.random() * 2 * s),
            "abstained": 0,
        }  # fmt: skip
        for b, s in units
        for i in range(30)
    ]
    fig = certified_accuracy_figure(records, units, [0.25, 0.5, 1.0])
    ax = fig.axes[0]
    assert outside_figure(fig) == []
    assert legend_outside_axes(fig, ax)
    assert "n = 30 images" in ax.get_ylabel() and "ℓ2" in ax.get_xlabel()


# --- bars: the ADP paper's Fig. 2 -----------------------------------------------------------------------
@pytest.mark.parametrize("natural", [0.875, 1.0])  # a 100% bar: its label still above the cap, inside
def test_defense_bars_value_labels_clear_of_error_bars(natural):
    columns = ["natural", "BPDA10+EOT4", "PGD5-EOT2 (full gradient)"]
    accs = [[natural, 0.406, 0.688], [0.75, 0.312, 0.562], [0.719, 0.25, 0.562], [0.844, 0.25, 0.375]]
    fig = P.defense_bars_figure(_bars(FIG2_ARMS, columns, accs), title="natural and robust accuracy")
    r = draw(fig)
    ax = fig.axes[0]
    assert outside_figure(fig) == []
    assert legend_outside_axes(fig, ax)
    values = [t for t in ax.texts if t.get_text().isdigit()]
    assert len(values) == 12
    value_boxes = [t.get_window_extent(r) for t in values]
    caps = error_bar_boxes(ax, r)
    assert len(caps) == 12 * 3  # one segment and two caps per bar
    hits = [
        (t.get_text(), i) for t, b in zip(values, value_boxes) for i, c in enumerate(caps) if intersect(b, c)
    ]
    assert hits == []
    assert pairwise_overlaps(value_boxes) == []
    ticks = [t.get_window_extent(r) for t in ax.get_xticklabels()]
    assert pairwise_overlaps(ticks) == []
    assert "n = 32 images" in ax.get_ylabel() and "%" in ax.get_ylabel()


def test_defense_bars_widen_for_long_group_labels():
    groups = [f"a defense with a rather long name number {k}" for k in range(5)]
    fig = P.defense_bars_figure(_bars(groups, ["natural", "attack"], [[0.9, 0.3]] * 5))
    r = draw(fig)
    ticks = [t.get_window_extent(r) for t in fig.axes[0].get_xticklabels()]
    assert pairwise_overlaps(ticks) == [] and outside_figure(fig) == []


# --- the example grid -----------------------------------------------------------------------------------
def test_image_grid_one_header_per_block_signed_perturbation_and_classes(tmp_path):
    rng = np.random.default_rng(3)
    eps = 0.15
    examples = [
        *_examples("adp_s0.25", "standard_rand", 8, eps, rng),
        *_examples("langevin_dsm", "bpda40_eot15", 2, eps, rng),
    ]
    labels = {"adp_s0.25": "DSM + Det (ADP)", "langevin_dsm": "DSM + Langevin", "bpda40_eot15": "BPDA10+EOT4"}
    names = SPECS["fmnist"].class_names
    kwargs = dict(eps={"standard_rand": eps, "bpda40_eot15": eps}, labels=labels, class_names=names)
    fig = P.image_grid_figure(examples, **kwargs)
    r = draw(fig)
    assert outside_figure(fig) == []
    headers = [t for t in fig.texts if t.get_fontweight() == "bold"]
    assert [h.get_text() for h in headers] == [
        "DSM + Det (ADP) · attack standard_rand · ε = 0.15 · test images #0–#7",
        "DSM + Langevin · attack BPDA10+EOT4 · ε = 0.15 · test images #0–#1",
    ]
    ylabels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert ylabels == ["adv − clean ([0, 1] pixel scale)"] * 2  # the colorbars'; no rotated label per row
    image_axes = [ax for ax in fig.axes if ax.images and not ax.get_ylabel() and len(ax.images) == 1]
    deltas = [ax for ax in image_axes if ax.images[0].get_cmap().name == P.PERTURBATION_CMAP]
    assert len(deltas) == 10
    for ax, e in zip(deltas, examples):
        im = ax.images[0]
        assert im.get_clim() == (-eps, eps)  # fixed symmetric scale, zero in the middle
        np.testing.assert_allclose(im.get_array(), (e.adversarial - e.clean)[0], atol=1e-6)
    assert min(float(ax.images[0].get_array().min()) for ax in deltas) < -0.1  # the sign is kept
    colorbars = [ax for ax in fig.axes if ax not in image_axes]
    assert len(colorbars) == 2
    assert [t.get_text() for t in colorbars[0].get_yticklabels()] == ["−0.15", "0", "+0.15"]
    # under each clean image its index and true class, under each purified one the prediction
    trues = [t for ax in fig.axes for t in ax.texts if "true:" in t.get_text()]
    preds = [t for ax in fig.axes for t in ax.texts if t.get_text().startswith("pred:")]
    assert len(trues) == len(preds) == 10
    for t, e in zip(trues, examples):
        box, cell = t.get_window_extent(r), t.axes.get_window_extent(r)
        assert t.get_text() == f"#{e.idx} · true: {names[e.label]}"
        assert box.y1 <= cell.y0 + 0.5 and cell.x0 - 4 <= box.x0 and box.x1 <= cell.x1 + 4
    for t, e in zip(preds, examples):
        ok = e.prediction == e.label
        assert t.get_text() == f"pred: {names[e.prediction]} {'✓' if ok else '✗'}"
        assert t.get_color() == (P.RIGHT if ok else P.WRONG)
    boxes = [t.get_window_extent(r) for t in texts(fig)]
    assert pairwise_overlaps(boxes) == []
    path = P.plot_image_grid(examples, tmp_path / "grid.png", **kwargs)
    w, h = P.grid_inches([8, 2])
    assert Image.open(path).size == (round(w * P.DPI), round(h * P.DPI))


def test_image_grid_without_classes_or_eps_scales_to_the_largest_change():
    rng = np.random.default_rng(4)
    examples = [e[:6] for e in _examples("adp", "pgd", 2, 0.1, rng)]  # old run dirs: no classes
    fig = P.image_grid_figure(examples)
    draw(fig)
    assert outside_figure(fig) == []
    deltas = [ax for ax in fig.axes if ax.images and ax.images[0].get_cmap().name == P.PERTURBATION_CMAP]
    assert deltas[0].images[0].get_clim() == pytest.approx((-0.1, 0.1))
    under = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "#0" in under and not any("true:" in t or t.startswith("pred:") for t in under)


def test_sample_grid_title_wraps_inside_and_clear_of_the_samples():
    images = np.stack([_blob(i) for i in range(16)])
    title = "ML-EBM samples: 16 persistent Langevin chains after 20 steps each (training step 500; images in [0, 1])"
    fig = P.sample_grid_figure(images, title, columns=8, zoom=1)
    r = draw(fig)
    assert outside_figure(fig) == []
    (text,) = fig.texts
    assert text.get_text().replace("\n", " ") == title
    assert not intersect(text.get_window_extent(r), fig.axes[0].get_window_extent(r))
    assert data_boxes(fig.axes[0], r) == [] and fig.axes[0].images  # the tile only, no axes decorations


# --- the report: captions under the figures, in results.md and W&B ----------------------------------
def _run_dir(tmp_path, rng):
    """A run dir with two defenses x (natural, standard_rand) and 2 grid examples per defense."""
    store_path = records_dir(tmp_path) / "rank0.sqlite"
    store_path.parent.mkdir(parents=True)
    with RecordStore(store_path) as store:
        for d in ("adp_s0.25", "langevin_dsm"):
            for a in ("natural", "standard_rand"):
                records = [
                    ("single", "softmax", i, float(i % 3 != 0 if a == "natural" else i % 2)) for i in range(8)
                ]
                examples = stats = None
                if a != "natural":
                    examples = [
                        (e.idx, e.clean, e.adversarial, e.purified) for e in _examples(d, a, 2, 0.15, rng)
                    ]
                    stats = {EXAMPLE_LABEL: {0: 3, 1: 1}, EXAMPLE_PREDICTION: {0: 3, 1: 7}}
                store.write_batch(d, a, 0, 0, 8, records, examples=examples, stats=stats)
    return tmp_path


def test_report_captions_carry_the_full_descriptions(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    run = _run_dir(tmp_path, rng)
    full = "standard_rand (APGD-CE, APGD-T-DLR x2; 10 it, EOT 2; later stages on unbroken images)"
    labels = {
        "adp_s0.25": "DSM + Det (ADP)",
        "langevin_dsm": "DSM + Langevin",
        "standard_rand": "standard_rand",
    }
    plan = ReportPlan(
        order=[(d, a) for d in ("adp_s0.25", "langevin_dsm") for a in ("natural", "standard_rand")],
        descriptions={"standard_rand": full, "adp_s0.25": "DSM + Det (ADP) = ADP σ=0.25: T=10"},
        eps={"standard_rand": 0.15},
        class_names=SPECS["fmnist"].class_names,
    )
    report = write_report(run, header_lines=["h"], labels=labels, merge="softmax", plan=plan)
    assert (
        set(report["captions"]) == set(report["plots"]) == {"defenses", "grid_adp_s0.25", "grid_langevin_dsm"}
    )
    assert full in report["captions"]["defenses"] and "ADP σ=0.25: T=10" in report["captions"]["defenses"]
    md = (run / "results.md").read_text()
    assert "| DSM + Det (ADP) | standard_rand |" in md  # table rows: the short labels of the plots
    assert f"**Labels.** {full}." in md
    assert "![defenses](plots/defenses.png)" in md and f"*{report['captions']['defenses']}*" in md
    # W&B: the same PNGs, each with its caption
    logged = {}

    class FakeImage:
        def __init__(self, path, caption=None):
            self.path, self.caption = path, caption

    fake = types.SimpleNamespace(Image=FakeImage, Table=lambda columns, data: (columns, data))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    from advpure.jobs.report import ReportCallback

    callback = ReportCallback(run, header_lines=["h"], labels=labels, merge="softmax", plan=plan, meta={})
    callback.report = report
    run_stub = types.SimpleNamespace(log=logged.update, summary={}, finish=lambda: None)
    callback._to_wandb(run_stub)
    for name, path in report["plots"].items():
        assert logged[f"plots/{name}"].path == str(path)
        assert logged[f"plots/{name}"].caption == report["captions"][name]


def test_examples_get_their_stored_classes():
    e = Example("d", "a", 4, *([np.zeros((1, 2, 2), np.float32)] * 3))
    stats = {("d", "a"): {EXAMPLE_LABEL: {4: 3.0}, EXAMPLE_PREDICTION: {4: 7.0}}}
    (joined,) = with_classes([e], stats)
    assert (joined.label, joined.prediction) == (3, 7)
    assert with_classes([e], {})[0].label is None


def test_attack_callback_stores_true_and_predicted_class_of_the_purified_example():
    from advpure.core.rng import SampleRNG
    from advpure.jobs.bench_loop import AttackCallback
    from advpure.jobs.plan import Unit
    from advpure.purify.defense import Defense

    torch.manual_seed(0)
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 10))
    defense = Defense(classifier, replicas=1)
    x = torch.rand(4, 1, 4, 4)
    y = torch.tensor([1, 2, 3, 4])
    idx = torch.tensor([0, 1, 2, 3])
    callback = AttackCallback(
        Unit("none", "pgd", None, 0.1, 0.01, "PGD"), worst_of_n=1, protocols=["single"], image_grid=3
    )
    x_adv = (x + 0.05).clamp(0, 1)
    examples, classes = callback._examples(defense, x, y, x_adv, idx, SampleRNG(0, idx, stream="t"))
    assert [e[0] for e in examples] == [0, 1, 2]
    assert classes[EXAMPLE_LABEL] == {0: 1, 1: 2, 2: 3}
    expected = classifier(x_adv[:3]).argmax(-1).tolist()  # identity purifier: the classifier's class of x_adv
    assert classes[EXAMPLE_PREDICTION] == dict(zip([0, 1, 2], expected))


def test_ebm_samples_png_has_its_title(tmp_path):
    """The EBM's MCMC sample grid is written with the line saying what it shows (and its size)."""
    from advpure.training.ebm import EBMModule, samples_title

    arch = {"arch": "conv", "nf": 4, "activation": "silu", "leak": 0.05, "in_channels": 1, "image_size": 28}
    module = EBMModule(arch, mcmc_steps=3, buffer_size=8, sample_dir=str(tmp_path), log_images=False)
    module._log_samples(torch.rand(16, 1, 28, 28), step=4)
    png = Image.open(tmp_path / "mcmc_step0000004.png")
    w, h = P.sample_grid_figure(np.zeros((16, 1, 28, 28)), samples_title(16, 3, 4)).get_size_inches()
    assert png.size == (round(w * P.DPI), round(h * P.DPI))
    assert samples_title(16, 3, 4).startswith("ML-EBM samples: 16 persistent Langevin chains after 3 steps")
