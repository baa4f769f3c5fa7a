"""Published diffusion-purification numbers, keyed by experiment, printed in that experiment's results.md."""

from __future__ import annotations

from advpure.config.compose import experiment_names
from advpure.results.cited_diffusion import CITED, cited_markdown, cited_rows
from advpure.results.report import ReportPlan, write_report
from advpure.results.store import RecordStore, records_dir

PUBLISHED = {
    "cifar10_diffpure": [
        "89.02",
        "70.64",
        "90.07",
        "71.29",
        "46.88",
        "45.31",
        "48.05",
        "48.28",
        "17.19",
        "39.45",
    ],
    "cifar10_gdmp": ["19.53", "7.03"],
    "imagenet_diffpure": ["67.79", "40.93", "28.13"],
}


def test_every_published_number_is_keyed_by_its_experiment():
    assert set(CITED) == set(PUBLISHED) and set(CITED) <= set(experiment_names())
    for experiment, numbers in PUBLISHED.items():
        got = [v for r in cited_rows(experiment) for v in (r.natural, r.robust) if v != "–"]
        assert sorted(got) == sorted(numbers), experiment
        md = cited_markdown(experiment)
        assert md.startswith("## Published numbers") and "not measured here" in md
        assert md.count("\n| ") == len(cited_rows(experiment)) + 1  # header + one line per row
    majority = [r for r in cited_rows("cifar10_diffpure") if r.protocol == "majority of 10"]
    assert [(r.classifier, r.robust) for r in majority] == [("WRN-70-16", "39.45")]
    assert cited_markdown("fmnist") == "" and cited_markdown(None) == "" and cited_rows("fmnist") == ()


def test_results_md_of_the_experiment_carries_its_cited_rows(tmp_path):
    store_path = records_dir(tmp_path) / "rank0.sqlite"
    store_path.parent.mkdir(parents=True)
    with RecordStore(store_path) as store:
        store.write_batch("diffpure", "natural", 0, 0, 4, [("single", "softmax", i, 1.0) for i in range(4)])
    plan = ReportPlan(order=[("diffpure", "natural")])
    meta = {"config": {"experiment": "imagenet_diffpure"}}
    write_report(tmp_path, header_lines=["h"], labels={}, merge="softmax", plan=plan, meta=meta)
    md = (tmp_path / "results.md").read_text()
    assert "| DiffPure | ResNet-50 |" in md and "40.93" in md and "28.13" in md
    write_report(tmp_path, header_lines=["h"], labels={}, merge="softmax", plan=plan, meta={"config": {}})
    assert "Published numbers" not in (tmp_path / "results.md").read_text()
