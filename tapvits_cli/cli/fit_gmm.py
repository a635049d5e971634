"""``tapvits fit-gmm``: on a device, private images → a Gaussian mixture artifact, nothing per sample."""

from __future__ import annotations

import re

import click

from tapvits_cli.cli.extractor import EXTRACTOR_HELP
from tapvits_cli.cli.options import CURRENT, FiniteFloat, WritingCommand, global_options
from tapvits_cli.cli.output import emit, log
from tapvits_cli.errors import UsageError
from tapvits_cli.vocabulary import (COVARIANCE_TYPES, DP_DEFAULT_COMPONENTS, DP_DEFAULT_DIM,
                                   DP_DEFAULT_ITERATIONS)

# The dataset reference is not recorded anywhere in the artifact (it may name a private
# path); lineage carries only the data's content fingerprint under this name.
PRIVATE_DATA_NAME = "private"


def parse_components(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    """'2-10', '3' or '2,4,8' → sorted distinct K >= 1 (None: the default of the fitting mode)."""
    if value is None:
        return None
    ks: set[int] = set()
    for item in value.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", item)
        low, high = (int(match[1]), int(match[2] or match[1])) if match else (0, -1)
        if not match or low < 1 or high < low:
            raise click.BadParameter(f"expected K >= 1 as a range or list like 2-10 or 2,4,8, got {value!r}")
        ks.update(range(low, high + 1))
    return sorted(ks)


@click.command("fit-gmm", cls=WritingCommand, short_help="On a device: fit a Gaussian mixture to features of private images.")
@click.argument("data")
@click.option("-e", "--extractor", "extractor_name", required=True, metavar="EXTRACTOR", help=EXTRACTOR_HELP)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="GMM artifact to write (.safetensors).")
@click.option("--pca-dim", type=click.IntRange(min=1), default=None,
              help="Keep this many PCA axes of the standardised features  [default: 32, or one per "
                   f"12 private samples when fewer; no PCA when that keeps every feature; at most {DP_DEFAULT_DIM} "
                   "with --dp-epsilon]")
@click.option("--no-pca", is_flag=True, help="Fit the mixture on the full feature vectors (no PCA).")
@click.option("--standardize/--no-standardize", default=True, show_default=True,
              help="Scale each feature to unit variance before PCA and fitting.")
@click.option("--components", default=None, callback=parse_components,
              help="Numbers of components K to try; the lowest BIC wins (range or list: 2-10, 2,4,8)  "
                   f"[default: 2-10; {DP_DEFAULT_COMPONENTS} with --dp-epsilon, which fits one K]")
@click.option("--covariance", type=click.Choice(COVARIANCE_TYPES), default=None,
              help="Covariance type of each component (scikit-learn's covariance_type)  "
                   "[default: full; diag with --dp-epsilon]")
@click.option("--reg-covar", type=FiniteFloat(min=0), default=1e-6, show_default=True,
              help="Added to each covariance diagonal, keeps components from collapsing.")
@click.option("--min-samples", type=click.IntRange(min=1), default=50, show_default=True,
              help="Refuse to fit on fewer private samples than this (privacy floor).")
@click.option("--noise-scale", type=FiniteFloat(min=0), default=0.0, show_default=True,
              help="Add seeded Gaussian noise of this many component standard deviations to each mean.")
@click.option("--dp-epsilon", type=FiniteFloat(), default=None,
              help="Fit with (epsilon, delta)-differential privacy: unit-norm features, private PCA, DP-EM "
                   "(protocol/gmm.md); smaller is more private.")
@click.option("--dp-delta", type=FiniteFloat(), default=1e-5, show_default=True, help="The delta of --dp-epsilon.")
@click.option("--dp-iterations", type=click.IntRange(min=1), default=DP_DEFAULT_ITERATIONS,
              show_default=True,
              help="EM iterations of the differentially private fit (each spends part of the budget).")
@click.option("--max-iter", type=click.IntRange(min=1), default=100, show_default=True, help="EM iterations per fit.")
@click.option("--n-init", type=click.IntRange(min=1), default=1, show_default=True,
              help="EM restarts per K; the best is kept.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images embedded per forward pass.")
@global_options
def command(data: str, extractor_name: str, output: str, pca_dim: int | None, no_pca: bool, standardize: bool,
            components: list[int] | None, covariance: str | None, reg_covar: float, min_samples: int,
            noise_scale: float, dp_epsilon: float | None, dp_delta: float, dp_iterations: int, max_iter: int,
            n_init: int, batch_size: int) -> None:
    """Fit a Gaussian mixture to EXTRACTOR features of the private dataset DATA.

    Runs on the device, offline. Features are standardised and PCA-projected (the
    projection travels inside the artifact), one mixture is fitted per K and the lowest
    BIC among those that keep every per-component privacy guarantee wins (each
    component supported by enough samples, a variance well above the regulariser, a
    mean away from every private sample). The artifact holds only the mixture, the
    projection and aggregate provenance (extractor fingerprint, sample count, BIC per K,
    timings): no image, label, feature vector or per-sample value, and not the DATA
    reference either. A fit that cannot keep the guarantees is refused (exit 2; see
    protocol/gmm.md). With --dp-epsilon the mixture is differentially private instead,
    and the budget spent is recorded in the artifact.

    Example: tapvits fit-gmm "fashion-mnist:split=train:classes=0,1:fold=0/2"
    --extractor base.safetensors -o device.gmm.safetensors
    """
    import time

    from tapvits_cli.artifacts.gmm import GmmInfo, write_gmm
    from tapvits_cli.artifacts.header import LineageEntry
    from tapvits_cli.cli.extractor import embed_dataset, extractor_lineage, resolve_extractor
    from tapvits_cli.data import open_dataset
    from tapvits_cli.gmm.dp import default_private_dim
    from tapvits_cli.gmm.fit import check_feasible, default_pca_dim
    from tapvits_cli.gmm.privacy import MIN_DISTANCE_RATIO, MIN_VARIANCE_RATIO, min_support
    from tapvits_cli.runtime import resolve_device, seed_everything

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
    seed_everything(CURRENT.seed)
    device = resolve_device(CURRENT.device)
    dataset = open_dataset(data)
    extractor = resolve_extractor(extractor_name, device)
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
            features, components[0], covariance, dim, dp_epsilon, dp_delta, dp_iterations)
    else:
        mixture, bic, converged, fit_seconds = _fit_by_bic(
            features, components, covariance, dim, standardize, reg_covar, min_samples, noise_scale, max_iter, n_init)
    privacy["min_samples_per_component"] = min_support(covariance, mixture.dim)
    log(f"K={mixture.components} components in {mixture.dim} dims from {len(features)} samples "
        f"(extraction {extract_seconds:.2f} s, fit {fit_seconds:.2f} s)")

    info = GmmInfo(samples=len(features), bic=bic, fit_seconds=fit_seconds, extract_seconds=extract_seconds,
                   extractor=extractor.fingerprint, converged=converged, privacy=privacy)
    params = {"pca_dim": dim, "standardize": standardize and not private, "components": components,
              "covariance": covariance, "reg_covar": reg_covar, "min_samples": min_samples,
              "noise_scale": noise_scale, "dp_epsilon": dp_epsilon, "dp_delta": dp_delta if private else None,
              "dp_iterations": dp_iterations if private else None, "max_iter": max_iter, "n_init": n_init,
              "batch_size": batch_size, "seed": CURRENT.seed, "device": device}
    inputs = {"extractor": extractor_lineage(extractor_name),
              "data": LineageEntry(dataset.fingerprint(), "dataset", PRIVATE_DATA_NAME)}
    path = write_gmm(output, mixture, info, params, inputs)
    result = {"output": str(path), "kind": "gmm", "components": mixture.components, "dim": mixture.dim,
              "samples": len(features), "bic": {str(k): v for k, v in bic.items()},
              "fit_seconds": fit_seconds, "extract_seconds": extract_seconds}
    if private:
        result["dp"] = {key: privacy["dp"][key] for key in ("epsilon", "delta", "rho")}
    emit(result, str(path))


def _fit_by_bic(features, components, covariance, dim, standardize, reg_covar, min_samples, noise_scale,
                max_iter, n_init):
    """The default fit: BIC over K among the fits that keep every per-component guarantee."""
    from tapvits_cli.gmm.fit import fit_mixture

    result = fit_mixture(features, components, covariance, dim, standardize, reg_covar, CURRENT.seed,
                         max_iter, n_init, min_samples, noise_scale)
    for k, reason in result.dropped.items():
        log(f"K={k} skipped: {reason}")
    if not result.converged:
        log(f"warning: EM did not converge for K={result.chosen_k} within {max_iter} iterations (--max-iter)")
    log("BIC " + ", ".join(f"K={k}: {v:.1f}" for k, v in result.bic_per_k.items()), level=1)
    return result.mixture, result.bic_per_k, result.converged, result.fit_seconds


def _fit_private(features, k, covariance, dim, epsilon, delta, iterations):
    """The (epsilon, delta)-DP fit; the guarantees it can check without the data are checked."""
    import time

    from tapvits_cli.gmm.dp import fit_private_mixture
    from tapvits_cli.gmm.privacy import audit_parameters, min_support

    start = time.perf_counter()
    support = min_support(covariance, dim)
    fit = fit_private_mixture(features, k, covariance, dim, epsilon, delta, iterations, CURRENT.seed, support)
    violations = audit_parameters(fit.mixture, len(features)).violations(support)
    if violations:
        raise UsageError(f"the differentially private mixture breaks a per-component guarantee: {violations[0]}; "
                         f"use fewer --components or a larger --dp-epsilon")
    if fit.dropped_components:
        log(f"{fit.dropped_components} of {k} components dropped: too little support after the privacy noise")
    log(f"differential privacy: epsilon {fit.epsilon:.4g}, delta {fit.delta:.3g} (zCDP rho {fit.rho:.4g}, "
        f"{iterations} EM iterations)")
    return fit.mixture, {}, None, time.perf_counter() - start, fit.record()
