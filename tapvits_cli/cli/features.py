"""``tapvits features``: embed a public pool into a resumable HDF5 feature table."""

from __future__ import annotations

import click

from tapvits_cli.cli.extractor import EXTRACTOR_HELP
from tapvits_cli.cli.options import CURRENT, WritingCommand, global_options
from tapvits_cli.cli.output import emit, log, progress_bar


@click.command("features", cls=WritingCommand, short_help="Embed a public pool into a resumable HDF5 feature table.")
@click.argument("data")
@click.option("-e", "--extractor", "extractor_name", required=True, metavar="EXTRACTOR", help=EXTRACTOR_HELP)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Feature table to write (.h5).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images embedded per forward pass (and rows per flushed write).")
@click.option("--restart", is_flag=True, help="Discard an interrupted run's OUTPUT.partial instead of resuming it.")
@global_options
def command(data: str, extractor_name: str, output: str, batch_size: int, restart: bool) -> None:
    """Embed every image of the dataset reference DATA with EXTRACTOR into a feature table.

    The table (one row per sample: id, label, pooled features) is what `select` scores
    each device's GMM against. It grows in OUTPUT.partial, flushed after every batch;
    after an interruption the same command resumes where it stopped, and the output
    appears only once complete.

    Example: tapvits features fashion-mnist:split=train --extractor efficientnet-lite0 -o pool.h5
    """
    import numpy as np

    from tapvits_cli.artifacts.digests import fingerprint_sha256
    from tapvits_cli.artifacts.features import open_feature_writer
    from tapvits_cli.cli.extractor import extractor_lineage, resolve_extractor
    from tapvits_cli.data import open_dataset
    from tapvits_cli.models.extract import extract_features
    from tapvits_cli.runtime import resolve_device, seed_everything

    seed_everything(CURRENT.seed)
    device = resolve_device(CURRENT.device)
    dataset = open_dataset(data)
    extractor = resolve_extractor(extractor_name, device)
    params = {"batch_size": batch_size, "seed": CURRENT.seed, "device": device}
    with open_feature_writer(output, extractor, dataset, params, extractor_lineage(extractor_name),
                             restart=restart) as writer:
        resumed_from = writer.rows_done
        if resumed_from:
            log(f"resuming {writer.partial}: {resumed_from} of {writer.rows} rows already embedded")
        batches = extract_features(extractor, dataset, batch_size, device,
                                   positions=np.arange(resumed_from, len(dataset)))
        try:
            with progress_bar("embedding", total=-(-len(dataset) // batch_size)) as advance:
                advance(resumed_from // batch_size)
                writer.write_batches(batches, on_progress=advance)
        except KeyboardInterrupt:
            log(f"stopped after {writer.rows_done} of {writer.rows} rows, kept in {writer.partial}; "
                "run the same command again to resume")
            raise
        path = writer.finish()
    log(f"{writer.rows} rows × {writer.dim} features from {extractor.fingerprint['architecture']}", level=1)
    emit({"output": str(path), "kind": "features", "rows": writer.rows, "dim": writer.dim,
          "resumed_from": resumed_from, "extractor_sha256": fingerprint_sha256(extractor.fingerprint)}, str(path))
