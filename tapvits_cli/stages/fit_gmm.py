"""``fit-gmm``: on a device, private images → a Gaussian mixture artifact, nothing per sample.

The artifact leaves the device: its lineage records the private data only by content
fingerprint, never by its reference (which may name a private path).
"""

from __future__ import annotations

from dataclasses import dataclass

from tapvits_cli.errors import UsageError
from tapvits_cli.stages.common import Written as Result, comma_list, dataset_lineage, option
from tapvits_cli.stages.feedback import log
from tapvits_cli.vocabulary import DP_DEFAULT_COMPONENTS, DP_DEFAULT_ITERATIONS, MAX_FEATURE_DIM

# The dataset reference is not recorded anywhere in the artifact (it may name a private
# path); lineage carries only the data's content fingerprint under this name.
PRIVATE_DATA_NAME = "private"


@dataclass(frozen=True, kw_only=True)
class Options:
    data: str = option("--data", recipe=False)
    extractor_name: str = option("--extractor", recipe=False)
    output: str = option("-o", recipe=False)
    pca_dim: int | None = option("--pca-dim")
    no_pca: bool = option("--no-pca", False)
    standardize: bool = option("--standardize", True, off="--no-standardize")
    components: list[int] | None = option("--components", render=comma_list)
    covariance: str | None = option("--covariance")
    reg_covar: float = option("--reg-covar", 1e-6)
    min_samples: int = option("--min-samples", 50)
    noise_scale: float = option("--noise-scale", 0.0)
    dp_epsilon: float | None = option("--dp-epsilon")
    dp_delta: float = option("--dp-delta", 1e-5)
    dp_iterations: int = option("--dp-iterations", DP_DEFAULT_ITERATIONS)
    max_iter: int = option("--max-iter", 100)
    n_init: int = option("--n-init", 1)
    batch_size: int = option("--batch-size", 256)
    seed: int = 0
    device: str = "auto"


def run(options: Options) -> Result:
    import time

    from tapvits_cli.artifacts.gmm import GmmInfo, write_gmm
    from tapvits_cli.data import open_dataset
    from tapvits_cli.gmm.dp import default_private_dim
    from tapvits_cli.gmm.fit import check_feasible, default_pca_dim
    from tapvits_cli.payloads.guarantees import MIN_DISTANCE_RATIO, MIN_VARIANCE_RATIO, min_support
    from tapvits_cli.runtime import resolve_device, seed_everything
    from tapvits_cli.stages.extractor import embed_dataset, resolve_extractor

    pca_dim, no_pca, standardize, components = options.pca_dim, options.no_pca, options.standardize, options.components
    covariance, reg_covar, min_samples, noise_scale = (options.covariance, options.reg_covar, options.min_samples,
                                                       options.noise_scale)
    dp_epsilon, dp_delta, dp_iterations = options.dp_epsilon, options.dp_delta, options.dp_iterations
    max_iter, n_init, batch_size = options.max_iter, options.n_init, options.batch_size
    if no_pca and pca_dim is not None:
        raise UsageError("--pca-dim and --no-pca are exclusive: choose one")
    private = dp_epsilon is not None
    if private and noise_scale > 0:
        raise UsageError("--noise-scale and --dp-epsilon are exclusive: the differentially private fit adds its own noise")
    if private and no_pca:
        raise UsageError("--dp-epsilon always fits a private PCA projection; drop --no-pca")
    covariance = covariance or ("diag" if private else "full")
    components = components or ([DP_DEFAULT_COMPONENTS] if private else list(range(2, 11)))
    if private and len(components) > 1:
        raise UsageError(f"--dp-epsilon fits one K (choosing K by BIC would spend privacy budget on every fit): "
                         f"give --components one number, e.g. --components {components[0]}")
    seed_everything(options.seed)
    device = resolve_device(options.device)
    dataset = open_dataset(options.data)
    extractor, extractor_lineage = resolve_extractor(options.extractor_name, device)
    if extractor.feature_dim > MAX_FEATURE_DIM:   # a GMM file may not be wider: every reader would refuse it
        raise UsageError(f"the extractor gives {extractor.feature_dim:,} features; a GMM holds at most "
                         f"{MAX_FEATURE_DIM:,}: use an extractor with fewer")
    if private:  # the private fit always projects (its PCA is part of the mechanism)
        dim = pca_dim or default_private_dim(len(dataset), extractor.feature_dim)
    else:
        dim = None if no_pca else pca_dim or default_pca_dim(len(dataset), extractor.feature_dim)
    # Refuse before spending time on extraction; the fit applies the same rule again.
    check_feasible(len(dataset), extractor.feature_dim, components, covariance, dim, min_samples)

    start = time.perf_counter()
    features = embed_dataset(extractor, dataset, batch_size, device, "embedding private images")
    extract_seconds = time.perf_counter() - start

    privacy = {"min_samples": min_samples, "noise_scale": noise_scale, "min_variance_ratio": MIN_VARIANCE_RATIO,
               "min_distance_ratio": MIN_DISTANCE_RATIO}
    if private:
        mixture, bic, converged, fit_seconds, privacy["dp"] = _fit_private(
            features, components[0], covariance, dim, dp_epsilon, dp_delta, dp_iterations, options.seed)
    else:
        mixture, bic, converged, fit_seconds = _fit_by_bic(
            features, components, covariance, dim, standardize, reg_covar, min_samples, noise_scale, max_iter, n_init,
            options.seed)
    privacy["min_samples_per_component"] = min_support(covariance, mixture.dim)
    log(f"K={mixture.components} components in {mixture.dim} dims from {len(features)} samples "
        f"(extraction {extract_seconds:.2f} s, fit {fit_seconds:.2f} s)")

    info = GmmInfo(samples=len(features), bic=bic, fit_seconds=fit_seconds, extract_seconds=extract_seconds,
                   extractor=extractor.fingerprint, converged=converged, privacy=privacy)
    params = {"pca_dim": dim, "standardize": standardize and not private, "components": components,
              "covariance": covariance, "reg_covar": reg_covar, "min_samples": min_samples,
              "noise_scale": noise_scale, "dp_epsilon": dp_epsilon, "dp_delta": dp_delta if private else None,
              "dp_iterations": dp_iterations if private else None, "max_iter": max_iter, "n_init": n_init,
              "batch_size": batch_size, "seed": options.seed, "device": device}
    inputs = {"extractor": extractor_lineage, "data": dataset_lineage(dataset, PRIVATE_DATA_NAME)}
    path = write_gmm(options.output, mixture, info, params, inputs)
    result = {"output": str(path), "kind": "gmm", "components": mixture.components, "dim": mixture.dim,
              "samples": len(features), "bic": {str(k): v for k, v in bic.items()},
              "fit_seconds": fit_seconds, "extract_seconds": extract_seconds}
    if private:
        result["dp"] = {key: privacy["dp"][key] for key in ("epsilon", "delta", "rho")}
    return Result(str(path), result)


def _fit_by_bic(features, components, covariance, dim, standardize, reg_covar, min_samples, noise_scale,
                max_iter, n_init, seed):
    """The default fit: BIC over K among the fits that keep every per-component guarantee."""
    from tapvits_cli.gmm.fit import fit_mixture

    result = fit_mixture(features, components, covariance, dim, standardize, reg_covar, seed,
                         max_iter, n_init, min_samples, noise_scale)
    for k, reason in result.dropped.items():
        log(f"K={k} skipped: {reason}")
    if not result.converged:
        log(f"warning: EM did not converge for K={result.chosen_k} within {max_iter} iterations (--max-iter)")
    log("BIC " + ", ".join(f"K={k}: {v:.1f}" for k, v in result.bic_per_k.items()), level=1)
    return result.mixture, result.bic_per_k, result.converged, result.fit_seconds


def _fit_private(features, k, covariance, dim, epsilon, delta, iterations, seed):
    """The (epsilon, delta)-DP fit; the guarantees it can check without the data are checked."""
    import time

    from tapvits_cli.gmm.dp import fit_private_mixture
    from tapvits_cli.payloads.guarantees import audit_parameters, min_support

    start = time.perf_counter()
    support = min_support(covariance, dim)
    fit = fit_private_mixture(features, k, covariance, dim, epsilon, delta, iterations, seed, support)
    violations = audit_parameters(fit.mixture, len(features)).violations(support)
    if violations:
        raise UsageError(f"the differentially private mixture breaks a per-component guarantee: {violations[0]}; "
                         f"use fewer --components or a larger --dp-epsilon")
    if fit.dropped_components:
        log(f"{fit.dropped_components} of {k} components dropped: too little support after the privacy noise")
    log(f"differential privacy: epsilon {fit.epsilon:.4g}, delta {fit.delta:.3g} (zCDP rho {fit.rho:.4g}, "
        f"{iterations} EM iterations)")
    return fit.mixture, {}, None, time.perf_counter() - start, fit.record()
