"""The ``report`` artifact: what ``eval`` measured, as one JSON object.

See protocol/report.md. The body holds accuracy (top-1, top-k, loss, per class), cost
(parameters, MACs) and latency; the header's lineage names the model file and the
dataset fingerprint it was measured on.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

from tapvits_cli.artifacts.containers import ArtifactFile, read_json_body, write_json
from tapvits_cli.artifacts.header import Header, LineageEntry
from tapvits_cli.artifacts.kinds import KindSpec, Summary, Table, read_artifact, register

KIND = "report"
VERSION = 1
_ACCURACY_TOLERANCE = 1e-9
_REQUIRED = {"model": dict, "dataset": str, "samples": int, "top1": float, "top5": float, "top5_k": int,
             "loss": float, "per_class": list, "parameters": int, "macs": int, "latency": list}
_CLASS_MEMBERS = {"label": int, "name": str, "samples": int, "correct": int, "accuracy": float}
_LATENCY_MEMBERS = {"batch_size": int, "median_ms": float, "p90_ms": float, "repeats": int, "warmup": int,
                    "threads": int, "device": str}


def write_report(path: str | os.PathLike, body: Mapping[str, Any], params: Mapping[str, Any],
                 inputs: Mapping[str, LineageEntry]):
    header = Header(kind=KIND, version=VERSION, inputs=dict(inputs), params=dict(params))
    return write_json(path, header, body)


def read_report(path: str | os.PathLike) -> dict[str, Any]:
    """The checked body of a report."""
    artifact = read_artifact(path, expect=KIND)
    return _checked_body(artifact)


def _is(value: Any, kind: type) -> bool:
    """JSON types: an integer is a valid float, a boolean is neither."""
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, kind)


def _check_members(artifact: ArtifactFile, where: str, value: Any, members: Mapping[str, type]) -> None:
    """``where`` names the object in messages ("" for the body itself)."""
    if not isinstance(value, dict):
        raise artifact.fail(f"'{where}' must be an object")
    prefix = f"{where}." if where else ""
    for name, kind in members.items():
        if name not in value:
            raise artifact.fail(f"required member '{prefix}{name}' is missing")
        if not _is(value[name], kind):
            expected = "a number" if kind is float else f"a {kind.__name__}"
            raise artifact.fail(f"member '{prefix}{name}' must be {expected}")


def _checked_body(artifact: ArtifactFile) -> dict[str, Any]:
    """Every rule of protocol/report.md: members and types, ranges, per-class consistency."""
    body = read_json_body(artifact)
    fail = artifact.fail
    _check_members(artifact, "", body, _REQUIRED)
    samples = body["samples"]
    if samples < 1:
        raise fail("'samples' must be at least 1")
    for name in ("top1", "top5"):
        if not 0.0 <= body[name] <= 1.0:
            raise fail(f"'{name}' must lie in [0, 1], is {body[name]}")
    if body["top5"] < body["top1"] or body["top5_k"] < 1:
        raise fail("'top5' must be at least 'top1' and 'top5_k' at least 1")
    if body["loss"] < 0 or body["parameters"] < 1 or body["macs"] < 0:
        raise fail("'loss' and 'macs' must be non-negative and 'parameters' positive")
    labels = set()
    for index, entry in enumerate(body["per_class"]):
        _check_members(artifact, f"per_class[{index}]", entry, _CLASS_MEMBERS)
        if entry["label"] in labels or entry["samples"] < 1 or not 0 <= entry["correct"] <= entry["samples"]:
            raise fail(f"per_class[{index}]: labels must be unique, samples ≥ 1 and 0 ≤ correct ≤ samples")
        if abs(entry["accuracy"] - entry["correct"] / entry["samples"]) > _ACCURACY_TOLERANCE:
            raise fail(f"per_class[{index}]: accuracy must equal correct / samples")
        labels.add(entry["label"])
    if sum(e["samples"] for e in body["per_class"]) != samples:
        raise fail("per-class sample counts must add up to 'samples'")
    if abs(sum(e["correct"] for e in body["per_class"]) / samples - body["top1"]) > _ACCURACY_TOLERANCE:
        raise fail("per-class correct counts must add up to top1 × samples")
    for index, entry in enumerate(body["latency"]):
        _check_members(artifact, f"latency[{index}]", entry, _LATENCY_MEMBERS)
        if entry["batch_size"] < 1 or entry["repeats"] < 1 or entry["threads"] < 1 \
                or not 0 < entry["median_ms"] <= entry["p90_ms"]:
            raise fail(f"latency[{index}]: needs batch_size, repeats, threads ≥ 1 and 0 < median_ms ≤ p90_ms")
    return body


def _validate(artifact: ArtifactFile) -> None:
    _checked_body(artifact)


def _summarize(artifact: ArtifactFile) -> Summary:
    body = _checked_body(artifact)   # cheap, and a broken body would break the tables below
    figures = {key: body.get(key) for key in ("dataset", "samples", "top1", "top5", "top5_k", "loss",
                                               "parameters", "macs")}
    figures["model"] = body.get("model")
    tables = [Table("per class", ["label", "name", "samples", "accuracy"],
                    [[e.get("label"), e.get("name"), e.get("samples"), e.get("accuracy")]
                     for e in body.get("per_class", [])])]
    if body.get("latency"):
        tables.append(Table("latency", ["batch", "median ms", "p90 ms", "threads", "device"],
                            [[e.get("batch_size"), e.get("median_ms"), e.get("p90_ms"), e.get("threads"),
                              e.get("device")] for e in body["latency"]]))
    return Summary(figures=figures, tables=tables)


SPEC = register(KindSpec(
    name=KIND, format="json", version=VERSION, validate=_validate, summarize=_summarize,
    description="an evaluation: accuracy, per-class accuracy, parameters, MACs and latency of a model",
))
