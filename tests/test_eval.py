"""``tapvits eval`` and the ``report`` artifact, on digits with the tiny ViT."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_VIT, TINY_VIT_KWARGS

FAST = ("--latency-repeats", "2", "--warmup-runs", "1")


@pytest.fixture
def report_file(tmp_path, tapvits, tiny_model_file):
    path = tmp_path / "report.json"
    result = tapvits("eval", tiny_model_file, "--data", "digits:split=test", "-o", path, *FAST)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(path)
    return path


def _direct_logits(model_file):
    """Logits and labels computed without the evaluation code, one batch."""
    from tapvits_cli.artifacts.model import load_model
    from tapvits_cli.data import open_dataset
    from tapvits_cli.data.preprocess import Preprocessing

    loaded = load_model(model_file)
    model, spec = loaded.module, loaded.spec
    dataset = open_dataset("digits:split=test")
    images = Preprocessing.from_dict(spec.preprocessing)(torch.from_numpy(dataset.images(range(len(dataset)))))
    with torch.no_grad():
        return model.eval()(images), torch.tensor(dataset.labels, dtype=torch.long)


def test_accuracy_matches_a_direct_computation(tmp_path, tapvits, tiny_model_file):
    result = tapvits("--json", "eval", tiny_model_file, "--data", "digits:split=test", "-o", tmp_path / "r.json",
                     "--batch-size", "50", "--no-latency")
    assert result.exit_code == 0, result.stderr
    body = result.json()
    logits, labels = _direct_logits(tiny_model_file)
    assert body["samples"] == len(labels)
    assert body["top1"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(1).float().mean().item()
    assert body["top5_k"] == 5 and body["top5"] == pytest.approx(top5)
    assert body["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert sum(e["samples"] for e in body["per_class"]) == body["samples"]
    assert sum(e["correct"] for e in body["per_class"]) == round(body["top1"] * body["samples"])
    for entry in body["per_class"]:
        mask = labels == entry["label"]
        assert entry["samples"] == int(mask.sum())
        assert entry["correct"] == int((logits.argmax(1)[mask] == entry["label"]).sum())
    assert body["latency"] == []
    assert json.loads((tmp_path / "r.json").read_text())["top1"] == body["top1"]


def test_per_class_lists_only_present_classes_and_top_k_is_clipped():
    from tapvits_cli.data import open_dataset
    from tapvits_cli.data.preprocess import Preprocessing
    from tapvits_cli.evaluation import evaluate
    from tapvits_cli.models.factory import create_model

    torch.manual_seed(0)
    model = create_model(TINY_VIT, {**TINY_VIT_KWARGS, "num_classes": 3})
    dataset = open_dataset("digits:split=test:classes=1,2")
    accuracy = evaluate(model, dataset, Preprocessing.from_model(model), 64, "cpu")
    assert accuracy.top5_k == 3 and accuracy.top5 == 1.0
    assert [label for label, *_ in accuracy.per_class()] == [1, 2]
    assert sum(samples for _, samples, _, _ in accuracy.per_class()) == len(dataset)


def test_macs_match_an_analytic_count_of_the_tiny_vit():
    from tapvits_cli.evaluation import count_macs
    from tapvits_cli.models.factory import create_model

    def analytic(dim, depth, heads, hidden, patch, image, classes):
        patches = (image // patch) ** 2
        tokens = patches + 1
        block = tokens * dim * 3 * dim + 2 * heads * tokens * tokens * (dim // heads) + tokens * dim * dim \
            + 2 * tokens * dim * hidden
        return patches * patch * patch * dim + depth * block + dim * classes

    k = TINY_VIT_KWARGS
    assert count_macs(create_model(TINY_VIT, k), (1, 8, 8)) == analytic(24, 2, 3, 48, 2, 8, 10)
    narrow = {**k, "embed_dim": 12, "num_heads": 2}
    assert count_macs(create_model(TINY_VIT, narrow), (1, 8, 8)) == analytic(12, 2, 2, 24, 2, 8, 10)


def test_report_carries_cost_latency_and_lineage(report_file, tiny_model_file):
    from tapvits_cli.artifacts.files import sha256_file
    from tapvits_cli.artifacts.kinds import read_artifact
    from tapvits_cli.artifacts.report import read_report
    from tapvits_cli.data import open_dataset

    body = read_report(report_file)
    assert body["parameters"] == 10594 and body["macs"] > 0
    assert [e["batch_size"] for e in body["latency"]] == [1, 32]
    for entry in body["latency"]:
        assert entry["median_ms"] > 0 and entry["p90_ms"] >= entry["median_ms"]
        assert entry["threads"] >= 1 and entry["repeats"] == 2 and entry["warmup"] == 1
    inputs = read_artifact(report_file).header.inputs
    assert inputs["model"].sha256 == sha256_file(tiny_model_file)
    assert inputs["data"].sha256 == open_dataset("digits:split=test").fingerprint()


def test_min_top1_threshold_sets_exit_code_after_writing(tmp_path, tapvits, tiny_model_file):
    failing = tmp_path / "fail.json"
    result = tapvits("eval", tiny_model_file, "--data", "digits:split=test", "-o", failing, "--no-latency",
                     "--min-top1", "0.99")
    assert result.exit_code == 6
    assert "below --min-top1 0.9900" in result.stderr and failing.is_file()
    passing = tapvits("eval", tiny_model_file, "--data", "digits:split=test", "-o", tmp_path / "ok.json",
                      "--no-latency", "--min-top1", "0.0")
    assert passing.exit_code == 0, passing.stderr


def test_report_validates_and_inspects(report_file, tapvits):
    assert tapvits("validate", report_file).exit_code == 0
    inspected = tapvits("--json", "inspect", report_file)
    assert inspected.exit_code == 0, inspected.stderr
    document = inspected.json()
    assert document["figures"]["samples"] == 364
    assert {t["title"] for t in document["tables"]} == {"per class", "latency"}


@pytest.mark.parametrize("corrupt", [
    lambda b: b.pop("top1"),
    lambda b: b.update(top1=1.5),
    lambda b: b.update(top5=True),
    lambda b: b["per_class"].pop(),
    lambda b: b["per_class"][0].update(accuracy=0.123),
    lambda b: b["latency"][0].update(median_ms=-1.0),
])
def test_corrupted_report_is_rejected(report_file, tapvits, corrupt):
    document = json.loads(report_file.read_text())
    corrupt(document)
    report_file.write_text(json.dumps(document))
    assert tapvits("validate", report_file).exit_code == 3


def test_bad_latency_batches_is_a_usage_error(tmp_path, tapvits, tiny_model_file):
    result = tapvits("eval", tiny_model_file, "--data", "digits:split=test", "-o", tmp_path / "r.json",
                     "--latency-batches", "1,x")
    assert result.exit_code == 2 and "--latency-batches" in result.stderr
