"""``eval``: a model + a labelled dataset → a report of accuracy, cost and latency.

The report's body (its schema is protocol/report.md) is built here; the command line
only shows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tapvits_cli.errors import IncompatibleArtifactError, InvalidArtifactError
from tapvits_cli.stages.common import argument, artifact_lineage, dataset_lineage, option, positive_integers
from tapvits_cli.stages.feedback import progress
from tapvits_cli.vocabulary import MAX_BATCH


def parse_latency_batches(text: str) -> tuple[int, ...]:
    """``--latency-batches`` read: the batch sizes latency is measured at (the command line checks with it too)."""
    return positive_integers("--latency-batches", text, MAX_BATCH)


@dataclass(frozen=True, kw_only=True)
class Options:
    model_path: str = argument()
    data: str = option("--data", recipe=False)
    output: str = option("-o", recipe=False)
    batch_size: int = option("--batch-size", 256)
    latency_batches: str = option("--latency-batches", "1,32")
    latency_repeats: int = option("--latency-repeats", 20)
    warmup_runs: int = option("--warmup-runs", 5)
    no_latency: bool = option("--no-latency", False)
    min_top1: float | None = option("--min-top1", recipe=False)   # a recipe's thresholds gate the run instead
    seed: int = 0
    device: str = "auto"


@dataclass(frozen=True)
class Result:
    output: str
    report: dict[str, Any]        # the report's body: what --json prints
    below_threshold: str | None   # why top-1 misses --min-top1 (the report is written anyway)


def run(options: Options) -> Result:
    import torch

    from tapvits_cli.artifacts.model import load_model
    from tapvits_cli.artifacts.report import write_report
    from tapvits_cli.data import open_dataset
    from tapvits_cli.data.preprocess import Preprocessing
    from tapvits_cli.evaluation import count_macs, evaluate, measure_latency
    from tapvits_cli.models.factory import count_parameters
    from tapvits_cli.runtime import resolve_device, seed_everything

    sizes = () if options.no_latency else parse_latency_batches(options.latency_batches)
    device = resolve_device(options.device)
    seed_everything(options.seed)
    dataset = open_dataset(options.data)
    loaded = load_model(options.model_path, device=device)
    model, spec = loaded.module, loaded.spec
    if len(dataset) and int(dataset.labels.max()) >= spec.num_classes:
        raise IncompatibleArtifactError(f"{options.model_path} has {spec.num_classes} classes, but {dataset.ref} has "
                                        f"label {int(dataset.labels.max())}; evaluate on a dataset with its classes")
    preprocessing = Preprocessing.from_dict(spec.preprocessing)

    with progress("eval", len(dataset)) as advance:
        accuracy = evaluate(model, dataset, preprocessing, options.batch_size, device, on_progress=advance)
    if not accuracy.finite:
        raise InvalidArtifactError(f"{options.model_path}: the model's outputs are not finite (NaN or infinity) for "
                                   f"{accuracy.nonfinite} of {accuracy.samples} samples of {dataset.ref}, loss "
                                   f"{accuracy.loss}: its weights are damaged or overflow; no report written")
    names = spec.class_names or dataset.class_names
    body = {
        "model": {"architecture": spec.architecture, "weights_sha256": loaded.artifact.metadata["model.weights_sha256"]},
        "dataset": str(dataset.ref),
        "samples": accuracy.samples, "top1": accuracy.top1, "top5": accuracy.top5, "top5_k": accuracy.top5_k,
        "loss": accuracy.loss,
        "per_class": [{"label": label, "name": str(names[label]) if label < len(names) else str(label),
                       "samples": samples, "correct": correct, "accuracy": value}
                      for label, samples, correct, value in accuracy.per_class()],
        "parameters": count_parameters(model),
        "macs": count_macs(model, preprocessing.input_size),
        "latency": [measure_latency(model, preprocessing.input_size, size, options.warmup_runs, options.latency_repeats,
                                    device) for size in sizes],
    }
    params = {"batch_size": options.batch_size, "latency_batches": list(sizes),
              "latency_repeats": options.latency_repeats, "warmup": options.warmup_runs, "min_top1": options.min_top1,
              "seed": options.seed, "device": device, "threads": torch.get_num_threads()}
    inputs = {"model": artifact_lineage(options.model_path, "model"), "data": dataset_lineage(dataset)}
    path = write_report(options.output, body, params, inputs)
    below = None
    if options.min_top1 is not None and accuracy.top1 < options.min_top1:
        below = (f"top-1 accuracy {accuracy.top1:.4f} is below --min-top1 {options.min_top1:.4f} "
                 f"(report written to {path})")
    return Result(str(path), body, below)
