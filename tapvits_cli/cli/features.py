"""``tapvits features``: embed a public pool into a resumable HDF5 feature table."""

from __future__ import annotations

import click

from tapvits_cli.cli.extractor import EXTRACTOR_HELP
from tapvits_cli.cli.options import WritingCommand, global_options
from tapvits_cli.cli.output import emit


@click.command("features", cls=WritingCommand, positional="--data",
               short_help="Embed a public pool into a resumable HDF5 feature table.")
@click.option("--data", required=True, metavar="REF", help="The public pool: a dataset reference (see `tapvits dataset`).")
@click.option("-e", "--extractor", "extractor_name", required=True, metavar="EXTRACTOR", help=EXTRACTOR_HELP)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Feature table to write (.h5).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images embedded per forward pass (and rows per flushed write).")
@click.option("--restart", is_flag=True, help="Discard an interrupted run's OUTPUT.partial instead of resuming it.")
@global_options
def command(data: str, extractor_name: str, output: str, batch_size: int, restart: bool) -> None:
    """Embed every image of the dataset reference --data with EXTRACTOR into a feature table.

    The table (one row per sample: id, label, pooled features) is what `select` scores
    each device's GMM against. It grows in OUTPUT.partial, flushed after every batch;
    after an interruption the same command resumes where it stopped, and the output
    appears only once complete.

    Example: tapvits features --data fashion-mnist:split=train --extractor efficientnet-lite0 -o pool.h5
    """
    from tapvits_cli.cli.stage_call import run_stage
    from tapvits_cli.stages import features

    result = run_stage(features)
    emit(result.document, result.output)
