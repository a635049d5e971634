"""What a run achieved, per device and over the fleet, and which thresholds it failed.

Pure: the caller reads the reports and metric sets and passes their contents in.
Selection precision is the share of the selected public images whose label is one the
device's private data holds; it exists only for simulated devices, whose private labels
the benchmark may look at (a real device's labels never leave it), and so do class
recall and the smallest class's ratio (``payloads.coverage.class_coverage``). Component
coverage is label-free: the metric set records it for every device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from tapvits_cli.payloads.coverage import class_coverage


@dataclass(frozen=True)
class DeviceResult:
    name: str
    report: Mapping[str, Any] | None          # the eval report body, when the device was evaluated
    selected_labels: np.ndarray | None        # public labels of the fine-tuning set, metric set first
    metric_size: int
    private_labels: np.ndarray | None         # labels of a simulated device's private split
    stage_seconds: Mapping[str, float]
    stage_sources: Mapping[str, str]
    coverage: Mapping[str, Any] | None = None   # the metric set's component coverage, when it records one


def _latency(report: Mapping[str, Any], batch: int) -> float | None:
    return next((entry["median_ms"] for entry in report["latency"] if entry["batch_size"] == batch), None)


def _precision(selected: np.ndarray, private: np.ndarray) -> float:
    return float(np.isin(selected, np.unique(private)).mean()) if len(selected) else 0.0


def device_row(result: DeviceResult, base_parameters: int) -> dict[str, Any]:
    row: dict[str, Any] = {"device": result.name}
    if result.report is not None:
        report = result.report
        row.update(top1=report["top1"], top5=report["top5"], loss=report["loss"], samples=report["samples"],
                   parameters=report["parameters"], params_kept=report["parameters"] / base_parameters,
                   macs=report["macs"], latency_ms_at_1=_latency(report, 1), latency_ms_at_32=_latency(report, 32))
    if result.selected_labels is not None and result.private_labels is not None:
        row["metric_precision"] = _precision(result.selected_labels[: result.metric_size], result.private_labels)
        row["finetune_precision"] = _precision(result.selected_labels, result.private_labels)
        for part, labels in (("metric", result.selected_labels[: result.metric_size]),
                             ("finetune", result.selected_labels)):
            for key, value in class_coverage(labels, result.private_labels).items():
                row[f"{part}_{key}"] = value
    if result.coverage is not None:
        for part in ("metric", "finetune"):
            row[f"{part}_coverage"] = result.coverage[part]["coverage"]
            row[f"{part}_worst_component_ratio"] = result.coverage[part]["worst_ratio"]
    row["stage_seconds"] = {stage: round(seconds, 2) for stage, seconds in result.stage_seconds.items()}
    row["stage_sources"] = dict(result.stage_sources)
    return row


def summarize(recipe_name: str, budget: float, results: Sequence[DeviceResult], base_parameters: int,
              thresholds: Mapping[str, float], shared_seconds: Mapping[str, float]) -> dict[str, Any]:
    """The run summary (``summary.json``, and stdout with ``--json``) and its threshold verdicts."""
    rows = [device_row(result, base_parameters) for result in results]
    evaluated = [row for row in rows if "top1" in row]
    mean = None
    if evaluated:
        weights = np.array([row["samples"] for row in evaluated], dtype=float)
        mean = {key: float(np.average([row[key] for row in evaluated], weights=weights))
                for key in ("top1", "top5", "params_kept")}
        mean["samples"] = int(weights.sum())
    failures = []
    if "min-top1" in thresholds:
        for row in evaluated:
            row["passed"] = row["top1"] >= thresholds["min-top1"]
        failures += [f"{row['device']}: top-1 {row['top1']:.4f} < min-top1 {thresholds['min-top1']}"
                     for row in evaluated if not row["passed"]]
    if "min-mean-top1" in thresholds and mean is not None and mean["top1"] < thresholds["min-mean-top1"]:
        failures.append(f"mean top-1 {mean['top1']:.4f} < min-mean-top1 {thresholds['min-mean-top1']}")
    return {"recipe": recipe_name, "budget": budget, "base_parameters": base_parameters, "devices": rows,
            "mean": mean, "shared_stage_seconds": {k: round(v, 2) for k, v in shared_seconds.items()},
            "thresholds": dict(thresholds), "failures": failures, "passed": not failures}
