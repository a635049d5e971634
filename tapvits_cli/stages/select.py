"""``select``: a device's GMM + the public pool → the metric set and the fine-tuning set."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tapvits_cli.errors import IncompatibleArtifactError, InvalidArtifactError, UsageError
from tapvits_cli.stages.common import Written as Result, argument, artifact_lineage, dataset_lineage, option
from tapvits_cli.stages.feedback import log, progress
from tapvits_cli.vocabulary import DEFAULT_SELECTION_STRATEGY, RATIO_STRATEGIES


@dataclass(frozen=True, kw_only=True)
class Options:
    gmm: str = argument()
    pool: str = option("--pool", recipe=False)
    output: str = option("-o", recipe=False)
    metric_size: int = option("--metric-size", 640)
    finetune_size: int = option("--finetune-size", 6400)
    strategy: str = option("--strategy", DEFAULT_SELECTION_STRATEGY)
    public_components: int = option("--public-components", 20)
    public_sample: int = option("--public-sample", 10000)
    prior_draws: int = option("--prior-draws", 20000)
    class_floor: float = option("--class-floor", 0.0)
    chunk_rows: int = option("--chunk-rows", 65536)
    extractor_name: str | None = option("--extractor", recipe=False)
    batch_size: int = option("--batch-size", 256, recipe=False)   # a run's pool is a feature table: no embedding
    seed: int = 0
    device: str = "auto"


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


def run(options: Options) -> Result:
    import contextlib
    import time

    import numpy as np

    from tapvits_cli.artifacts.digests import fingerprint_sha256
    from tapvits_cli.artifacts.features import open_feature_table
    from tapvits_cli.artifacts.gmm import read_gmm
    from tapvits_cli.artifacts.metric_set import write_metric_set
    from tapvits_cli.data import open_dataset
    from tapvits_cli.payloads.coverage import selection_coverage
    from tapvits_cli.payloads.mixture import score_in_chunks
    from tapvits_cli.runtime import resolve_device, seed_everything
    from tapvits_cli.selection import select_from_scores
    from tapvits_cli.selection.class_prior import estimate_class_prior
    from tapvits_cli.selection.density_ratio import (fit_public_mixture, rows_at, sample_positions,
                                                     score_ratio_in_chunks)
    from tapvits_cli.stages.extractor import resolve_extractor, stream_features

    gmm, pool, output, strategy = options.gmm, options.pool, options.output, options.strategy
    metric_size, finetune_size, chunk_rows = options.metric_size, options.finetune_size, options.chunk_rows
    public_components, public_sample = options.public_components, options.public_sample
    extractor_name, batch_size = options.extractor_name, options.batch_size
    seed_everything(options.seed)
    device = resolve_device(options.device)
    read = read_gmm(gmm)
    mixture, info = read.mixture, read.info
    inputs = {"gmm": artifact_lineage(gmm, "gmm")}
    with contextlib.ExitStack() as stack:
        if _is_artifact(pool):
            if extractor_name:
                raise UsageError("--extractor is only for a dataset --pool; a feature table already fixes its extractor")
            table = stack.enter_context(open_feature_table(pool))
            _require_same_extractor(gmm, info, pool, table.extractor_sha256, table.extractor)
            pool_size, description = table.rows, table.dataset
            classes = table.dataset.get("num_classes")
            if not isinstance(classes, int):   # optional in a table: the whole pool's labels say, not a sample's
                classes = int(table.labels().max(initial=-1)) + 1

            def sample_rows(positions):
                return rows_at(table.iter_chunks(chunk_rows), positions)

            chunks = table.iter_chunks(chunk_rows)
            inputs["pool"] = artifact_lineage(pool, "features")
        else:
            dataset = open_dataset(pool)
            if not extractor_name:
                raise UsageError(f"a dataset --pool needs --extractor: the one {gmm} was fitted with "
                                 f"({info.extractor.get('architecture')}), or pass a feature table as --pool")
            extractor, inputs["extractor"] = resolve_extractor(extractor_name, device)
            _require_same_extractor(gmm, info, f"--extractor {extractor_name}", fingerprint_sha256(extractor.fingerprint),
                                    extractor.fingerprint)
            pool_size, description, classes = len(dataset), dataset.provenance(), dataset.num_classes

            def sample_rows(positions):   # embeds only the sampled rows
                rows = list(stream_features(extractor, dataset, batch_size, device, positions=positions))
                return np.concatenate([f for _, f, _ in rows]), np.concatenate([y for _, _, y in rows])

            chunks = stream_features(extractor, dataset, batch_size, device)
            inputs["pool"] = dataset_lineage(dataset)
        started = time.perf_counter()
        public = prior = None
        if strategy in RATIO_STRATEGIES:
            features, labels = sample_rows(sample_positions(pool_size, public_sample, options.seed))
            public = fit_public_mixture(features, mixture, public_components, options.seed)
            log(f"public mixture: {public.mixture.components} {public.mixture.covariance_type}-covariance "
                f"components on {public.samples:,} pool rows in {public.fit_seconds:.1f} s"
                + ("" if public.converged else " (EM did not converge)"))
            if strategy == "class-prior":
                prior = estimate_class_prior(mixture, features, labels, classes, options.prior_draws, options.seed)
                held = np.flatnonzero(prior.shares)
                log(f"class prior: {len(held)} of {classes} classes held, "
                    + ", ".join(f"{c}: {prior.shares[c]:.1%}" for c in held[np.argsort(-prior.shares[held])][:10])
                    + f" ({prior.iterations} EM iterations over {prior.draws:,} draws of the device mixture"
                    + ("" if prior.converged else ", not converged") + ")")
        with progress("scoring pool", pool_size) as advance:
            scored = (score_ratio_in_chunks(mixture, public.mixture, chunks, advance) if public is not None
                      else score_in_chunks(mixture, chunks, advance))
            selection = select_from_scores(scored, pool_size, mixture.weights, metric_size, finetune_size,
                                           strategy, options.seed,
                                           class_shares=None if prior is None else prior.shares,
                                           class_floor=options.class_floor)
        scoring_seconds = time.perf_counter() - started
    overflowed = int((~np.isfinite(selection.log_likelihood)).sum())
    if overflowed:   # a mixture's values can pass every check on the file and still overflow on real features
        raise InvalidArtifactError(f"{gmm}: its log-density overflows on {overflowed:,} of the {finetune_size:,} "
                                   "selected pool rows (values out of range for these features); nothing is "
                                   "selected by it")

    params = {"metric_size": metric_size, "finetune_size": finetune_size, "strategy": strategy,
              "public_components": public_components, "public_sample": public_sample,
              "prior_draws": options.prior_draws, "class_floor": options.class_floor,
              "chunk_rows": chunk_rows, "batch_size": batch_size, "seed": options.seed, "device": device}
    coverage = selection_coverage(selection.component, mixture.weights, metric_size)
    path = write_metric_set(output, selection, description, inputs["gmm"].sha256, info.extractor_sha256, params, inputs,
                            coverage=coverage, public_mixture=public.describe() if public is not None else None,
                            class_prior=prior.describe() if prior is not None else None)
    loglik = selection.log_likelihood
    metric = loglik[:metric_size]
    log(f"{strategy}: metric set {metric_size:,} and fine-tuning set {finetune_size:,} of {pool_size:,} pool samples; "
        f"log-likelihood {metric.min():.2f}..{metric.max():.2f} (metric set), {loglik.min():.2f}..{loglik.max():.2f} "
        f"(fine-tuning set); component coverage {coverage['metric']['coverage']:.2f} (metric set), "
        f"{coverage['finetune']['coverage']:.2f} (fine-tuning set)")
    return Result(str(path), {"output": str(path), "kind": "metric-set", "strategy": strategy, "metric_size": metric_size,
          "finetune_size": finetune_size, "pool_samples": pool_size, "scoring_seconds": round(scoring_seconds, 3),
          "log_likelihood": {"metric": [float(metric.min()), float(metric.max())],
                             "finetune": [float(loglik.min()), float(loglik.max())]},
          "coverage": coverage, **({"public_mixture": public.describe()} if public is not None else {}),
          **({"class_prior": prior.describe()} if prior is not None else {})})
