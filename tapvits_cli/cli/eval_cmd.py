"""``tapvits eval``: model + labelled dataset → a report of accuracy, cost and latency."""

from __future__ import annotations

from pathlib import Path

import click

from tapvits_cli.cli.options import CURRENT, FiniteFloat, WritingCommand, global_options
from tapvits_cli.cli.output import emit, progress_bar, stderr_console
from tapvits_cli.errors import BelowThresholdError, IncompatibleArtifactError, InvalidArtifactError, UsageError


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise UsageError(f"--latency-batches must be positive integers separated by commas (e.g. 1,32), got '{text}'")
    return sizes


@click.command("eval", cls=WritingCommand, short_help="Accuracy, MACs and latency of a model on a labelled set.")
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True, dir_okay=False))
@click.option("--data", required=True, metavar="REF",
              help="Labelled dataset reference, e.g. fashion-mnist:split=test.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Report artifact to write (.json).")
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True, help="Batch size of the accuracy pass.")
@click.option("--latency-batches", default="1,32", show_default=True, metavar="B,B",
              help="Batch sizes at which latency is measured.")
@click.option("--latency-repeats", type=click.IntRange(1), default=20, show_default=True,
              help="Timed runs per batch size (the median and p90 are reported).")
@click.option("--warmup", type=click.IntRange(0), default=5, show_default=True, help="Untimed runs before timing.")
@click.option("--no-latency", is_flag=True, help="Skip the latency measurement.")
@click.option("--min-top1", type=FiniteFloat(0, 1), metavar="X",
              help="Exit with code 6 when top-1 accuracy is below X (the report is written anyway).")
@global_options
def command(model_path: str, data: str, output: str, batch_size: int, latency_batches: str, latency_repeats: int,
            warmup: int, no_latency: bool, min_top1: float | None) -> None:
    """Measure MODEL on --data: top-1, top-5, loss, per-class accuracy, parameters, MACs
    (torch's FLOP counter, MACs = FLOPs / 2) and latency (median and p90 of repeated
    runs after a warm-up, thread count recorded).

    The report goes to -o; stdout gets its path, or the report body as one JSON object
    with --json; a table goes to stderr. With --min-top1 the command fails with exit code
    6 when top-1 is below the threshold, after writing the report.

    Example: tapvits eval pruned.safetensors --data fashion-mnist:split=test -o pruned.report.json --min-top1 0.8
    """
    import torch

    from tapvits_cli.artifacts.files import sha256_file
    from tapvits_cli.artifacts.header import LineageEntry
    from tapvits_cli.artifacts.model import load_model
    from tapvits_cli.artifacts.report import write_report
    from tapvits_cli.data import open_dataset
    from tapvits_cli.data.preprocess import Preprocessing
    from tapvits_cli.evaluation import count_macs, evaluate, measure_latency
    from tapvits_cli.models.factory import count_parameters
    from tapvits_cli.runtime import resolve_device, seed_everything

    sizes = () if no_latency else _batch_sizes(latency_batches)
    device = resolve_device(CURRENT.device)
    seed_everything(CURRENT.seed)
    dataset = open_dataset(data)
    model, spec, artifact = load_model(model_path, device=device)
    if len(dataset) and int(dataset.labels.max()) >= spec.num_classes:
        raise IncompatibleArtifactError(f"{model_path} has {spec.num_classes} classes, but {dataset.ref} has label "
                                        f"{int(dataset.labels.max())}; evaluate on a dataset with its classes")
    preprocessing = Preprocessing.from_dict(spec.preprocessing)

    with progress_bar("eval", len(dataset)) as advance:
        accuracy = evaluate(model, dataset, preprocessing, batch_size, device, on_progress=advance)
    if not accuracy.finite:
        raise InvalidArtifactError(f"{model_path}: the model's outputs are not finite (NaN or infinity) for "
                                   f"{accuracy.nonfinite} of {accuracy.samples} samples of {dataset.ref}, loss "
                                   f"{accuracy.loss}: its weights are damaged or overflow; no report written")
    names = spec.class_names or dataset.class_names
    body = {
        "model": {"architecture": spec.architecture, "weights_sha256": artifact.metadata["model.weights_sha256"]},
        "dataset": str(dataset.ref),
        "samples": accuracy.samples, "top1": accuracy.top1, "top5": accuracy.top5, "top5_k": accuracy.top5_k,
        "loss": accuracy.loss,
        "per_class": [{"label": label, "name": str(names[label]) if label < len(names) else str(label),
                       "samples": samples, "correct": correct, "accuracy": value}
                      for label, samples, correct, value in accuracy.per_class()],
        "parameters": count_parameters(model),
        "macs": count_macs(model, preprocessing.input_size),
        "latency": [measure_latency(model, preprocessing.input_size, size, warmup, latency_repeats, device)
                    for size in sizes],
    }
    params = {"batch_size": batch_size, "latency_batches": list(sizes), "latency_repeats": latency_repeats,
              "warmup": warmup, "min_top1": min_top1, "seed": CURRENT.seed, "device": device,
              "threads": torch.get_num_threads()}
    inputs = {"model": LineageEntry(sha256_file(model_path), "model", Path(model_path).name),
              "data": LineageEntry(dataset.fingerprint(), "dataset", str(dataset.ref))}
    path = write_report(output, body, params, inputs)
    if CURRENT.verbosity >= 0:
        _show(body)
    emit(body, str(path))
    if min_top1 is not None and accuracy.top1 < min_top1:
        raise BelowThresholdError(f"top-1 accuracy {accuracy.top1:.4f} is below --min-top1 {min_top1:.4f} "
                                  f"(report written to {path})")


def _show(body: dict) -> None:
    """The human view on stderr: headline figures, then latency per batch size."""
    from rich.table import Table

    table = Table(title=f"eval on {body['dataset']} ({body['samples']} samples)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("top-1", f"{body['top1']:.2%}")
    table.add_row(f"top-{body['top5_k']}", f"{body['top5']:.2%}")
    table.add_row("loss", f"{body['loss']:.4f}")
    worst = min(body["per_class"], key=lambda e: e["accuracy"])
    table.add_row("worst class", f"{worst['name']} {worst['accuracy']:.2%}")
    table.add_row("parameters", f"{body['parameters']:,}")
    table.add_row("MACs", f"{body['macs']:,}")
    for entry in body["latency"]:
        table.add_row(f"latency, batch {entry['batch_size']}",
                      f"{entry['median_ms']:.2f} ms (p90 {entry['p90_ms']:.2f}, {entry['threads']} threads)")
    stderr_console().print(table)
