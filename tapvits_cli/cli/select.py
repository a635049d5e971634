"""``tapvits select``: a device's GMM + the public pool → the metric set and fine-tuning set."""

from __future__ import annotations

from pathlib import Path

import click

from tapvits_cli.cli.extractor import EXTRACTOR_HELP
from tapvits_cli.cli.options import CURRENT, global_options
from tapvits_cli.cli.output import emit, log, progress_bar
from tapvits_cli.errors import IncompatibleArtifactError, InvalidArtifactError, UsageError


def _is_artifact(pool: str) -> bool:
    """A tapvits artifact file (a feature table, or a wrong kind to refuse); else a dataset reference."""
    from tapvits_cli.artifacts.containers import open_file

    if not Path(pool).is_file():
        return False
    try:
        open_file(pool)
    except InvalidArtifactError:
        return False  # e.g. an .npz or a plain HDF5 dataset file
    return True


def _require_same_extractor(gmm: str, gmm_info, pool: str, sha256: str, fingerprint) -> None:
    if sha256 != gmm_info.extractor_sha256:
        raise IncompatibleArtifactError(
            f"{gmm} was fitted on {gmm_info.extractor.get('architecture')} features (extractor "
            f"{gmm_info.extractor_sha256[:12]}), but {pool} gives {fingerprint.get('architecture')} features "
            f"(extractor {sha256[:12]}): embed the pool with the extractor the GMM was fitted with"
        )


@click.command("select", short_help="Pick the public samples most likely under a device's GMM.")
@click.argument("gmm", type=click.Path(exists=True, dir_okay=False))
@click.option("--pool", required=True,
              help="The public pool: a feature table from `tapvits features`, or a dataset reference (with --extractor).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Metric set to write (.h5).")
@click.option("--metric-size", type=click.IntRange(min=1), default=640, show_default=True,
              help="Rows of the metric set (the most likely; used by `score`).")
@click.option("--finetune-size", type=click.IntRange(min=1), default=6400, show_default=True,
              help="Rows of the fine-tuning set, which contains the metric set.")
@click.option("--strategy", type=click.Choice(["topk", "stratified", "random"]), default="topk", show_default=True,
              help="topk: highest log-likelihood; stratified: per-component quotas by mixture weight; "
                   "random: seeded uniform sample (ablation).")
@click.option("--chunk-rows", type=click.IntRange(min=1), default=65536, show_default=True,
              help="Feature-table rows scored at a time (memory stays bounded by this).")
@click.option("-e", "--extractor", "extractor_name", metavar="EXTRACTOR",
              help="Only with a dataset --pool: embeds it on the fly. " + EXTRACTOR_HELP)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images embedded per forward pass (dataset --pool only).")
@global_options
def command(gmm: str, pool: str, output: str, metric_size: int, finetune_size: int, strategy: str,
            chunk_rows: int, extractor_name: str | None, batch_size: int) -> None:
    """Score every public sample of POOL under the device's GMM and keep the most likely.

    Writes one ordered list of pool sample ids: the first --metric-size rows are the
    metric set, all --finetune-size rows the fine-tuning set. The GMM's extractor
    fingerprint must equal the pool's (exit code 4 otherwise). A pool of any size is
    scored in chunks with bounded memory.

    Example: tapvits select device.gmm.safetensors --pool pool.h5 -o device.metric.h5
    """
    import contextlib
    import time

    from tapvits_cli.artifacts.features import open_feature_table
    from tapvits_cli.artifacts.files import sha256_file
    from tapvits_cli.artifacts.gmm import read_gmm
    from tapvits_cli.artifacts.header import LineageEntry
    from tapvits_cli.artifacts.metric_set import write_metric_set
    from tapvits_cli.cli.extractor import extractor_lineage, resolve_extractor
    from tapvits_cli.data import open_dataset
    from tapvits_cli.gmm.mixture import score_in_chunks
    from tapvits_cli.models.extract import extract_features
    from tapvits_cli.runtime import resolve_device, seed_everything
    from tapvits_cli.selection import select_from_scores

    seed_everything(CURRENT.seed)
    device = resolve_device(CURRENT.device)
    mixture, info, _ = read_gmm(gmm)
    inputs = {"gmm": LineageEntry(sha256_file(gmm), "gmm", Path(gmm).name)}
    with contextlib.ExitStack() as stack:
        if _is_artifact(pool):
            if extractor_name:
                raise UsageError("--extractor is only for a dataset --pool; a feature table already fixes its extractor")
            table = stack.enter_context(open_feature_table(pool))
            _require_same_extractor(gmm, info, pool, table.extractor_sha256, table.extractor)
            pool_size, description = table.rows, table.dataset
            chunks = table.iter_chunks(chunk_rows)
            inputs["pool"] = LineageEntry(sha256_file(pool), "features", Path(pool).name)
        else:
            dataset = open_dataset(pool)
            if not extractor_name:
                raise UsageError(f"a dataset --pool needs --extractor: the one {gmm} was fitted with "
                                 f"({info.extractor.get('architecture')}), or pass a feature table as --pool")
            extractor = resolve_extractor(extractor_name, device)
            _require_same_extractor(gmm, info, f"--extractor {extractor_name}", extractor.fingerprint_sha256,
                                    extractor.fingerprint)
            pool_size, description = len(dataset), dataset.provenance()
            chunks = extract_features(extractor, dataset, batch_size, device)
            inputs["pool"] = LineageEntry(dataset.fingerprint(), "dataset", str(dataset.ref))
            inputs["extractor"] = extractor_lineage(extractor_name)
        started = time.perf_counter()
        with progress_bar("scoring pool", total=pool_size) as advance:
            selection = select_from_scores(score_in_chunks(mixture, chunks, advance), pool_size, mixture.weights,
                                           metric_size, finetune_size, strategy, CURRENT.seed)
        scoring_seconds = time.perf_counter() - started

    params = {"metric_size": metric_size, "finetune_size": finetune_size, "strategy": strategy,
              "chunk_rows": chunk_rows, "batch_size": batch_size, "seed": CURRENT.seed, "device": device}
    path = write_metric_set(output, selection, description, sha256_file(gmm), info.extractor_sha256, params, inputs)
    loglik = selection.log_likelihood
    metric = loglik[:metric_size]
    log(f"{strategy}: metric set {metric_size:,} and fine-tuning set {finetune_size:,} of {pool_size:,} pool samples; "
        f"log-likelihood {metric.min():.2f}..{metric.max():.2f} (metric set), {loglik.min():.2f}..{loglik.max():.2f} "
        f"(fine-tuning set)")
    emit({"output": str(path), "kind": "metric-set", "strategy": strategy, "metric_size": metric_size,
          "finetune_size": finetune_size, "pool_samples": pool_size, "scoring_seconds": round(scoring_seconds, 3),
          "log_likelihood": {"metric": [float(metric.min()), float(metric.max())],
                             "finetune": [float(loglik.min()), float(loglik.max())]}}, str(path))
