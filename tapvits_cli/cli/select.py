"""``tapvits select``: a device's GMM + the public pool → the metric set and fine-tuning set."""

from __future__ import annotations

from pathlib import Path

import click

from tapvits_cli.cli.extractor import EXTRACTOR_HELP
from tapvits_cli.cli.options import CURRENT, WritingCommand, global_options
from tapvits_cli.cli.output import emit, log, progress_bar
from tapvits_cli.errors import IncompatibleArtifactError, InvalidArtifactError, UsageError
from tapvits_cli.vocabulary import DEFAULT_SELECTION_STRATEGY, RATIO_STRATEGIES, SELECTION_STRATEGIES


def _is_artifact(pool: str) -> bool:
    """A tapvits artifact file (a feature table, or a wrong kind to refuse); else a dataset reference."""
    from tapvits_cli.artifacts.containers import open_file

    if not Path(pool).is_file():
        return False
    try:
        open_file(pool)
    except InvalidArtifactError:
        # e.g. an .npz or a plain HDF5 dataset file; but a damaged artifact (a truncated feature
        # table) still names its kind near the start: it is refused as an artifact, exit 3
        with open(pool, "rb") as handle:
            return b"tapvits.kind" in handle.read(1 << 16)
    return True


def _require_same_extractor(gmm: str, gmm_info, pool: str, sha256: str, fingerprint) -> None:
    if sha256 != gmm_info.extractor_sha256:
        raise IncompatibleArtifactError(
            f"{gmm} was fitted on {gmm_info.extractor.get('architecture')} features (extractor "
            f"{gmm_info.extractor_sha256[:12]}), but {pool} gives {fingerprint.get('architecture')} features "
            f"(extractor {sha256[:12]}): embed the pool with the extractor the GMM was fitted with"
        )


@click.command("select", cls=WritingCommand, short_help="Pick the public samples most likely under a device's GMM.")
@click.argument("gmm", type=click.Path(exists=True, dir_okay=False))
@click.option("--pool", required=True,
              help="The public pool: a feature table from `tapvits features`, or a dataset reference (with --extractor).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Metric set to write (.h5).")
@click.option("--metric-size", type=click.IntRange(min=1), default=640, show_default=True,
              help="Rows of the metric set (the most likely; used by `score`).")
@click.option("--finetune-size", type=click.IntRange(min=1), default=6400, show_default=True,
              help="Rows of the fine-tuning set, which contains the metric set.")
@click.option("--strategy", type=click.Choice(SELECTION_STRATEGIES), default=DEFAULT_SELECTION_STRATEGY, show_default=True,
              help="topk: highest log-likelihood (the paper); stratified: per-component quotas by mixture weight, "
                   "most likely first; ratio: highest density ratio against a mixture of the public pool; "
                   "ratio-stratified: the quotas of stratified, filled by density ratio; random: seeded uniform "
                   "sample (ablation).")
@click.option("--public-components", type=click.IntRange(min=1), default=20, show_default=True,
              help="Components of the public-pool mixture (ratio strategies only; fewer if the sample is small).")
@click.option("--public-sample", type=click.IntRange(min=1), default=10000, show_default=True,
              help="Pool rows, a seeded uniform sample, the public mixture is fitted on (ratio strategies only).")
@click.option("--chunk-rows", type=click.IntRange(min=1), default=65536, show_default=True,
              help="Feature-table rows scored at a time (memory stays bounded by this).")
@click.option("-e", "--extractor", "extractor_name", metavar="EXTRACTOR",
              help="Only with a dataset --pool: embeds it on the fly. " + EXTRACTOR_HELP)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images embedded per forward pass (dataset --pool only).")
@global_options
def command(gmm: str, pool: str, output: str, metric_size: int, finetune_size: int, strategy: str,
            public_components: int, public_sample: int, chunk_rows: int, extractor_name: str | None,
            batch_size: int) -> None:
    """Score every public sample of POOL under the device's GMM and keep the best.

    Writes one ordered list of pool sample ids: the first --metric-size rows are the
    metric set, all --finetune-size rows the fine-tuning set. The GMM's extractor
    fingerprint must equal the pool's (exit code 4 otherwise). A pool of any size is
    scored in chunks with bounded memory. The ratio strategies first fit a mixture of
    the public pool (--public-sample rows) in the GMM's projection and rank by
    log p_device - log p_public. Reports coverage: how the selected rows' shares per
    mixture component compare with the component weights (1 - total variation).

    Example: tapvits select device.gmm.safetensors --pool pool.h5 -o device.metric.h5
    """
    import contextlib
    import time

    import numpy as np

    from tapvits_cli.artifacts.digests import fingerprint_sha256
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
    from tapvits_cli.selection import select_from_scores, selection_coverage
    from tapvits_cli.selection.density_ratio import (fit_public_mixture, rows_at, sample_positions,
                                                     score_ratio_in_chunks)

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

            def sample_features(positions):
                return rows_at(table.iter_chunks(chunk_rows), positions)

            chunks = table.iter_chunks(chunk_rows)
            inputs["pool"] = LineageEntry(sha256_file(pool), "features", Path(pool).name)
        else:
            dataset = open_dataset(pool)
            if not extractor_name:
                raise UsageError(f"a dataset --pool needs --extractor: the one {gmm} was fitted with "
                                 f"({info.extractor.get('architecture')}), or pass a feature table as --pool")
            extractor = resolve_extractor(extractor_name, device)
            _require_same_extractor(gmm, info, f"--extractor {extractor_name}", fingerprint_sha256(extractor.fingerprint),
                                    extractor.fingerprint)
            pool_size, description = len(dataset), dataset.provenance()

            def sample_features(positions):   # embeds only the sampled rows
                return np.concatenate([f for _, f, _ in extract_features(extractor, dataset, batch_size, device,
                                                                         positions=positions)])

            chunks = extract_features(extractor, dataset, batch_size, device)
            inputs["pool"] = LineageEntry(dataset.fingerprint(), "dataset", str(dataset.ref))
            inputs["extractor"] = extractor_lineage(extractor_name)
        started = time.perf_counter()
        public = None
        if strategy in RATIO_STRATEGIES:
            positions = sample_positions(pool_size, public_sample, CURRENT.seed)
            public = fit_public_mixture(sample_features(positions), mixture, public_components, CURRENT.seed)
            log(f"public mixture: {public.mixture.components} {public.mixture.covariance_type}-covariance "
                f"components on {public.samples:,} pool rows in {public.fit_seconds:.1f} s"
                + ("" if public.converged else " (EM did not converge)"))
        with progress_bar("scoring pool", total=pool_size) as advance:
            scored = (score_ratio_in_chunks(mixture, public.mixture, chunks, advance) if public is not None
                      else score_in_chunks(mixture, chunks, advance))
            selection = select_from_scores(scored, pool_size, mixture.weights, metric_size, finetune_size,
                                           strategy, CURRENT.seed)
        scoring_seconds = time.perf_counter() - started

    params = {"metric_size": metric_size, "finetune_size": finetune_size, "strategy": strategy,
              "public_components": public_components, "public_sample": public_sample,
              "chunk_rows": chunk_rows, "batch_size": batch_size, "seed": CURRENT.seed, "device": device}
    coverage = selection_coverage(selection.component, mixture.weights, metric_size)
    path = write_metric_set(output, selection, description, sha256_file(gmm), info.extractor_sha256, params, inputs,
                            coverage=coverage, public_mixture=public.describe() if public is not None else None)
    loglik = selection.log_likelihood
    metric = loglik[:metric_size]
    log(f"{strategy}: metric set {metric_size:,} and fine-tuning set {finetune_size:,} of {pool_size:,} pool samples; "
        f"log-likelihood {metric.min():.2f}..{metric.max():.2f} (metric set), {loglik.min():.2f}..{loglik.max():.2f} "
        f"(fine-tuning set); component coverage {coverage['metric']['coverage']:.2f} (metric set), "
        f"{coverage['finetune']['coverage']:.2f} (fine-tuning set)")
    emit({"output": str(path), "kind": "metric-set", "strategy": strategy, "metric_size": metric_size,
          "finetune_size": finetune_size, "pool_samples": pool_size, "scoring_seconds": round(scoring_seconds, 3),
          "log_likelihood": {"metric": [float(metric.min()), float(metric.max())],
                             "finetune": [float(loglik.min()), float(loglik.max())]},
          "coverage": coverage, **({"public_mixture": public.describe()} if public is not None else {})}, str(path))
