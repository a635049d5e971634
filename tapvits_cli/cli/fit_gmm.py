"""``tapvits fit-gmm``: on a device, private images → a Gaussian mixture artifact, nothing per sample."""

from __future__ import annotations

import re

import click

from tapvits_cli.cli.extractor import EXTRACTOR_HELP
from tapvits_cli.cli.options import CURRENT, global_options
from tapvits_cli.cli.output import emit, log, progress_bar
from tapvits_cli.errors import UsageError

COVARIANCES = ("full", "diag", "tied", "spherical")  # gmm.mixture.COVARIANCE_TYPES, without importing numpy
DEFAULT_PCA_DIM = 32
# The dataset reference is not recorded anywhere in the artifact (it may name a private
# path); lineage carries only the data's content fingerprint under this name.
PRIVATE_DATA_NAME = "private"


def parse_components(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    """'2-10', '3' or '2,4,8' → sorted distinct K >= 1."""
    ks: set[int] = set()
    for item in value.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", item)
        low, high = (int(match[1]), int(match[2] or match[1])) if match else (0, -1)
        if not match or low < 1 or high < low:
            raise click.BadParameter(f"expected K >= 1 as a range or list like 2-10 or 2,4,8, got {value!r}")
        ks.update(range(low, high + 1))
    return sorted(ks)


@click.command("fit-gmm", short_help="On a device: fit a Gaussian mixture to features of private images.")
@click.argument("data")
@click.option("-e", "--extractor", "extractor_name", required=True, metavar="EXTRACTOR", help=EXTRACTOR_HELP)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="GMM artifact to write (.safetensors).")
@click.option("--pca-dim", type=click.IntRange(min=1), default=None,
              help=f"Keep this many PCA axes of the standardised features  [default: {DEFAULT_PCA_DIM}; "
                   "no PCA when the features have that many dims or fewer]")
@click.option("--no-pca", is_flag=True, help="Fit the mixture on the full feature vectors (no PCA).")
@click.option("--standardize/--no-standardize", default=True, show_default=True,
              help="Scale each feature to unit variance before PCA and fitting.")
@click.option("--components", default="2-10", show_default=True, callback=parse_components,
              help="Numbers of components K to try; the lowest BIC wins (range or list: 2-10, 2,4,8).")
@click.option("--covariance", type=click.Choice(COVARIANCES), default="full", show_default=True,
              help="Covariance type of each component (scikit-learn's covariance_type).")
@click.option("--reg-covar", type=click.FloatRange(min=0), default=1e-6, show_default=True,
              help="Added to each covariance diagonal, keeps components from collapsing.")
@click.option("--min-samples", type=click.IntRange(min=1), default=50, show_default=True,
              help="Refuse to fit on fewer private samples than this (privacy floor).")
@click.option("--noise-scale", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Add seeded Gaussian noise of this many component standard deviations to each mean.")
@click.option("--max-iter", type=click.IntRange(min=1), default=100, show_default=True, help="EM iterations per fit.")
@click.option("--n-init", type=click.IntRange(min=1), default=1, show_default=True,
              help="EM restarts per K; the best is kept.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images embedded per forward pass.")
@global_options
def command(data: str, extractor_name: str, output: str, pca_dim: int | None, no_pca: bool, standardize: bool,
            components: list[int], covariance: str, reg_covar: float, min_samples: int, noise_scale: float,
            max_iter: int, n_init: int, batch_size: int) -> None:
    """Fit a Gaussian mixture to EXTRACTOR features of the private dataset DATA.

    Runs on the device, offline. Features are standardised and PCA-projected (the
    projection travels inside the artifact), one mixture is fitted per K and the lowest
    BIC wins. The artifact holds only the mixture, the projection and aggregate
    provenance (extractor fingerprint, sample count, BIC per K, timings): no image,
    label, feature vector or per-sample value, and not the DATA reference either. Too
    few samples for the chosen dimension and covariance is refused (see protocol/gmm.md).

    Example: tapvits fit-gmm "fashion-mnist:split=train:classes=0,1:fold=0/2"
    --extractor base.safetensors -o device.gmm.safetensors
    """
    import time

    import numpy as np

    from tapvits_cli.artifacts.gmm import GmmInfo, write_gmm
    from tapvits_cli.artifacts.header import LineageEntry
    from tapvits_cli.cli.extractor import extractor_lineage, resolve_extractor
    from tapvits_cli.data import open_dataset
    from tapvits_cli.gmm.fit import check_feasible, fit_mixture, min_samples_per_component
    from tapvits_cli.models.extract import extract_features
    from tapvits_cli.runtime import resolve_device, seed_everything

    if no_pca and pca_dim is not None:
        raise UsageError("--pca-dim and --no-pca are exclusive: choose one")
    seed_everything(CURRENT.seed)
    device = resolve_device(CURRENT.device)
    dataset = open_dataset(data)
    extractor = resolve_extractor(extractor_name, device)
    if no_pca or (pca_dim is None and extractor.feature_dim <= DEFAULT_PCA_DIM):
        dim = None  # nothing to reduce: PCA onto every axis would only rotate
    else:
        dim = pca_dim or DEFAULT_PCA_DIM
    # Refuse before spending time on extraction; fit_mixture applies the same rule again.
    check_feasible(len(dataset), extractor.feature_dim, components, covariance, dim, min_samples)

    start = time.perf_counter()
    batches = []
    with progress_bar("embedding private images", total=len(dataset)) as advance:
        for ids, features, _labels in extract_features(extractor, dataset, batch_size, device):
            batches.append(features)
            advance(len(ids))
    features = np.concatenate(batches)
    extract_seconds = time.perf_counter() - start

    result = fit_mixture(features, components, covariance, dim, standardize, reg_covar, CURRENT.seed,
                         max_iter, n_init, min_samples, noise_scale)
    for k, reason in result.dropped.items():
        log(f"K={k} skipped: {reason}")
    if not result.converged:
        log(f"warning: EM did not converge for K={result.chosen_k} within {max_iter} iterations (--max-iter)")
    log("BIC " + ", ".join(f"K={k}: {v:.1f}" for k, v in result.bic_per_k.items()), level=1)
    log(f"K={result.chosen_k} components in {result.mixture.dim} dims from {result.samples} samples "
        f"(extraction {extract_seconds:.2f} s, fit {result.fit_seconds:.2f} s)")

    mixture_dim = result.mixture.dim
    info = GmmInfo(
        samples=result.samples, bic=result.bic_per_k, fit_seconds=result.fit_seconds,
        extract_seconds=extract_seconds, extractor=extractor.fingerprint, converged=result.converged,
        privacy={"min_samples": min_samples, "noise_scale": noise_scale,
                 "min_samples_per_component": min_samples_per_component(covariance, mixture_dim)},
    )
    params = {"pca_dim": dim, "standardize": standardize, "components": components, "covariance": covariance,
              "reg_covar": reg_covar, "min_samples": min_samples, "noise_scale": noise_scale, "max_iter": max_iter,
              "n_init": n_init, "batch_size": batch_size, "seed": CURRENT.seed, "device": device}
    inputs = {"extractor": extractor_lineage(extractor_name),
              "data": LineageEntry(dataset.fingerprint(), "dataset", PRIVATE_DATA_NAME)}
    path = write_gmm(output, result.mixture, info, params, inputs)
    emit({"output": str(path), "kind": "gmm", "components": result.chosen_k, "dim": mixture_dim,
          "samples": result.samples, "bic": {str(k): v for k, v in result.bic_per_k.items()},
          "fit_seconds": result.fit_seconds, "extract_seconds": extract_seconds}, str(path))
