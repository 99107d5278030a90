"""The model card of a registered digits run: its sections in order, its numbers those of
metrics.json, the manifest and evaluate's report, and the registry holding it: the card logged
with the version, its summary the version's description."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from components.core import outputs
from components.data.dataset import read_manifest
from tests.support.projects import tracking_into

SECTIONS = ["Intended use and limits", "Data", "Training", "Test metrics", "Weakest classes",
            "Calibration", "Registry decision", "Lineage", "How to use it"]


def section(card: str, title: str) -> str:
    return card.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def table(text: str) -> list[list[str]]:
    """The rows of the markdown tables in `text`, header and separator lines left out."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|") and not line.startswith("|---")]
    return [r for r in rows if r[0] not in ("class", "metric")]


@pytest.fixture(scope="module")
def card(registered) -> str:
    return (Path(registered.params.paths.register) / outputs.MODEL_CARD).read_text()


@pytest.mark.slow  # a tracking server and a trained model
def test_the_card_has_every_section_in_order(card, registered):
    front, body = card.removeprefix("---\n").split("\n---\n", 1)
    meta = yaml.safe_load(front)
    assert meta["model_name"] == registered.name and meta["version"] == registered.version
    assert meta["pipeline_tag"] == "image-classification" and meta["datasets"] == ["digits"]
    titles = re.findall(r"^## (.+)$", body, flags=re.M)
    assert titles == SECTIONS
    assert body.lstrip().startswith(f"# {registered.name} version {registered.version}\n")


@pytest.mark.slow  # a tracking server and a trained model
def test_the_cards_numbers_are_the_pipelines(card, registered):
    params = registered.params
    metrics = json.loads((Path(params.paths.evaluate) / outputs.METRICS).read_text())
    report = json.loads((Path(params.paths.evaluate) / outputs.REPORT_JSON).read_text())
    manifest = read_manifest(params.paths.prepared)

    overall = dict(row for row in table(section(card, "Test metrics")) if len(row) == 2)
    for key, label in [("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"),
                       ("top5", "top-5 accuracy"),
                       ("macro_f1", "macro F1"), ("ece", "ECE"), ("loss", "loss (cross-entropy)")]:
        assert float(overall[label]) == pytest.approx(metrics[key], abs=5e-5), label
    per_class = [row for row in table(section(card, "Test metrics")) if len(row) == 5]
    assert [r[0] for r in per_class] == [str(d) for d in range(10)]
    for name, precision, recall, f1, support in per_class:
        assert float(recall) == pytest.approx(report[name]["recall"], abs=5e-5)
        assert float(precision) == pytest.approx(report[name]["precision"], abs=5e-5)
        assert float(f1) == pytest.approx(report[name]["f1-score"], abs=5e-5)
        assert int(support) == manifest["counts"]["test"][name]
    assert f"On the test split ({metrics['n_test']} images)" in card
    assert f"ECE {metrics['ece']:.4f}" in card.split("\n## ", 1)[0]  # in the summary

    weakest = [r[0] for r in table(section(card, "Weakest classes"))]
    assert weakest == sorted([str(d) for d in range(10)], key=lambda c: (
        report[c]["f1-score"], report[c]["recall"], c))[:3]
    data = table(section(card, "Data"))
    assert data[-1] == ["**all**", *(str(manifest["num"][s]) for s in ("train", "val", "test"))]
    for split, digest in manifest["hashes"].items():
        assert f"- {split}: `{digest}`" in section(card, "Data")
    assert "Exact duplicates across splits: 0 found" in card

    training = section(card, "Training")
    assert "epochs: 2 run of 2" in training and "device: cpu" in training
    assert "`train.epochs: 2`" in training and "`predict." not in training


@pytest.mark.slow  # a tracking server and a trained model
def test_the_registry_holds_the_card_and_its_summary(card, registered):
    import mlflow
    from mlflow import MlflowClient

    version = MlflowClient(registered.mlflow).get_model_version(registered.name,
                                                                registered.version)
    summary = card.split(f"# {registered.name} version {registered.version}\n\n", 1)[1]
    assert version.description.startswith(summary.split("\n\n", 1)[0])
    assert "promoted it to champion: no champion yet" in version.description
    lineage = section(card, "Lineage")
    for tag in ("git.commit", "params.hash", "data.hash"):
        assert f"`{version.tags[tag]}`" in lineage, tag
    assert version.run_id in lineage and registered.mlflow in lineage  # a link to the run
    with tracking_into(registered.mlflow):
        local = Path(mlflow.artifacts.download_artifacts(
            f"models:/{registered.name}/{registered.version}"))
    assert (local / outputs.MODEL_CARD).read_text() == card
