"""``features``: embed a public pool into a resumable HDF5 feature table."""

from __future__ import annotations

from dataclasses import dataclass

from tapvits_cli.stages.common import Written as Result, option
from tapvits_cli.stages.feedback import log, progress


@dataclass(frozen=True, kw_only=True)
class Options:
    data: str = option("--data", recipe=False)
    extractor_name: str = option("--extractor", recipe=False)
    output: str = option("-o", recipe=False)
    batch_size: int = option("--batch-size", 256)
    restart: bool = option("--restart", False, recipe=False)   # a run resumes a half-written table
    seed: int = 0
    device: str = "auto"


def run(options: Options) -> Result:
    import time

    import numpy as np

    from tapvits_cli.artifacts.digests import fingerprint_sha256
    from tapvits_cli.artifacts.features import open_feature_writer
    from tapvits_cli.data import open_dataset
    from tapvits_cli.runtime import resolve_device, seed_everything
    from tapvits_cli.stages.extractor import resolve_extractor, stream_features

    seed_everything(options.seed)
    device = resolve_device(options.device)
    dataset = open_dataset(options.data)
    extractor, lineage = resolve_extractor(options.extractor_name, device)
    params = {"batch_size": options.batch_size, "seed": options.seed, "device": device}
    with open_feature_writer(options.output, extractor, dataset, params, lineage, restart=options.restart) as writer:
        resumed_from = writer.rows_done
        if resumed_from:
            log(f"resuming {writer.partial}: {resumed_from} of {writer.rows} rows already embedded")
        batches = stream_features(extractor, dataset, options.batch_size, device,
                                  positions=np.arange(resumed_from, len(dataset)))
        started = time.perf_counter()
        try:
            with progress("embedding images", len(dataset)) as advance:
                advance(resumed_from)

                def embedded(rows: int) -> None:
                    seconds = time.perf_counter() - started
                    rate = (writer.rows_done - resumed_from) / seconds if seconds > 0 else None
                    advance(rows, None if rate is None else f"{rate:.0f} images/s")

                writer.write_batches(batches, on_progress=embedded)
        except KeyboardInterrupt:
            log(f"stopped after {writer.rows_done} of {writer.rows} rows, kept in {writer.partial}; "
                "run the same command again to resume")
            raise
        seconds = time.perf_counter() - started
        path = writer.finish()
    images = writer.rows - resumed_from
    speed = images / seconds if seconds > 0 and images else None
    log(f"embedded {images:,} images in {seconds:.1f} s" + (f", {speed:.0f} images/s" if speed else "")
        + (f" (rows 0-{resumed_from - 1} were already there)" if resumed_from else "")
        + f": {writer.rows:,} rows × {writer.dim} features from {extractor.fingerprint['architecture']}")
    return Result(str(path), {"output": str(path), "kind": "features", "rows": writer.rows, "dim": writer.dim,
                              "resumed_from": resumed_from, "seconds": round(seconds, 3),
                              "images_per_second": None if speed is None else round(speed, 1),
                              "extractor_sha256": fingerprint_sha256(extractor.fingerprint)})
