"""``tapvits eval``: model + labelled dataset → a report of accuracy, cost and latency."""

from __future__ import annotations

import click

from tapvits_cli.cli.options import CURRENT, FiniteFloat, WritingCommand, checked_by, global_options
from tapvits_cli.cli.output import emit, stderr_console
from tapvits_cli.errors import BelowThresholdError
from tapvits_cli.stages.eval import parse_latency_batches


@click.command("eval", cls=WritingCommand, renamed={"--warmup": "--warmup-runs"},
               short_help="Accuracy, MACs and latency of a model on a labelled set.")
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True, dir_okay=False))
@click.option("--data", required=True, metavar="REF",
              help="Labelled dataset reference, e.g. fashion-mnist:split=test.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Report artifact to write (.json).")
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True, help="Batch size of the accuracy pass.")
@click.option("--latency-batches", default="1,32", show_default=True, metavar="B,B",
              callback=checked_by(parse_latency_batches),
              help="Batch sizes at which latency is measured.")
@click.option("--latency-repeats", type=click.IntRange(1), default=20, show_default=True,
              help="Timed runs per batch size (the median and p90 are reported).")
@click.option("--warmup-runs", type=click.IntRange(0), default=5, show_default=True,
              help="Untimed runs per batch size before the timed ones.")
@click.option("--no-latency", is_flag=True, help="Skip the latency measurement.")
@click.option("--min-top1", type=FiniteFloat(0, 1), metavar="X",
              help="Exit with code 6 when top-1 accuracy is below X (the report is written anyway).")
@global_options
def command(model_path: str, data: str, output: str, batch_size: int, latency_batches: str, latency_repeats: int,
            warmup_runs: int, no_latency: bool, min_top1: float | None) -> None:
    """Measure MODEL on --data: top-1, top-5, loss, per-class accuracy, parameters, MACs
    (torch's FLOP counter, MACs = FLOPs / 2) and latency (median and p90 of repeated
    runs after a warm-up, thread count recorded).

    The report goes to -o; stdout gets its path, or the report body as one JSON object
    with --json; a table goes to stderr. With --min-top1 the command fails with exit code
    6 when top-1 is below the threshold, after writing the report.

    Example: tapvits eval pruned.safetensors --data fashion-mnist:split=test -o pruned.report.json --min-top1 0.8
    """
    from tapvits_cli.cli.stage_call import run_stage
    from tapvits_cli.stages import eval as eval_stage

    result = run_stage(eval_stage)
    if CURRENT.verbosity >= 0:
        _show(result.report)
    emit(result.report, result.output)
    if result.below_threshold:
        raise BelowThresholdError(result.below_threshold)


def _show(body: dict) -> None:
    """The human view on stderr: headline figures, then latency per batch size."""
    from rich.table import Table

    from tapvits_cli.reporting.terminal import printable

    table = Table(title=printable(f"eval on {body['dataset']} ({body['samples']} samples)", one_line=True))
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("top-1", f"{body['top1']:.2%}")
    table.add_row(f"top-{body['top5_k']}", f"{body['top5']:.2%}")
    table.add_row("loss", f"{body['loss']:.4f}")
    worst = min(body["per_class"], key=lambda e: e["accuracy"])
    table.add_row("worst class", printable(f"{worst['name']} {worst['accuracy']:.2%}", one_line=True))
    table.add_row("parameters", f"{body['parameters']:,}")
    table.add_row("MACs", f"{body['macs']:,}")
    for entry in body["latency"]:
        table.add_row(f"latency, batch {entry['batch_size']}",
                      f"{entry['median_ms']:.2f} ms (p90 {entry['p90_ms']:.2f}, {entry['threads']} threads)")
    stderr_console().print(table)
