"""``tapvits fit-gmm``: on a device, private images → a Gaussian mixture artifact, nothing per sample."""

from __future__ import annotations

import click

from tapvits_cli.cli.extractor import EXTRACTOR_HELP
from tapvits_cli.cli.options import FiniteFloat, WritingCommand, global_options, integer_ranges
from tapvits_cli.cli.output import emit
from tapvits_cli.vocabulary import (COVARIANCE_TYPES, DP_DEFAULT_COMPONENTS, DP_DEFAULT_DIM, DP_DEFAULT_ITERATIONS,
                                    MAX_COMPONENTS)


@click.command("fit-gmm", cls=WritingCommand, positional="--data",
               short_help="On a device: fit a Gaussian mixture to features of private images.")
@click.option("--data", required=True, metavar="REF",
              help="The private images: a dataset reference (see `tapvits dataset`); never recorded in the artifact.")
@click.option("-e", "--extractor", "extractor_name", required=True, metavar="EXTRACTOR", help=EXTRACTOR_HELP)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="GMM artifact to write (.safetensors).")
@click.option("--pca-dim", type=click.IntRange(min=1), default=None,
              help="Keep this many PCA axes of the standardised features  [default: 32, or one per "
                   f"12 private samples when fewer; no PCA when that keeps every feature; at most {DP_DEFAULT_DIM} "
                   "with --dp-epsilon]")
@click.option("--no-pca", is_flag=True, help="Fit the mixture on the full feature vectors (no PCA).")
@click.option("--standardize/--no-standardize", default=True, show_default=True,
              help="Scale each feature to unit variance before PCA and fitting.")
@click.option("--components", default=None,
              callback=integer_ranges(1, f"K from 1 to {MAX_COMPONENTS} as a range or list like 2-10 or 2,4,8",
                                      MAX_COMPONENTS),
              help="Numbers of components K to try; the lowest BIC wins (range or list: 2-10, 2,4,8)  "
                   f"[default: 2-10; {DP_DEFAULT_COMPONENTS} with --dp-epsilon, which fits one K]")
@click.option("--covariance", type=click.Choice(COVARIANCE_TYPES), default=None,
              help="Covariance type of each component (scikit-learn's covariance_type)  "
                   "[default: full; diag with --dp-epsilon]")
@click.option("--reg-covar", type=FiniteFloat(min=0), default=1e-6, show_default=True,
              help="Added to each covariance diagonal, keeps components from collapsing.")
@click.option("--min-samples", type=click.IntRange(min=1), default=50, show_default=True,
              help="Refuse to fit on fewer private samples than this (privacy floor).")
@click.option("--noise-scale", type=FiniteFloat(0, 1000.0), default=0.0, show_default=True,
              help="Add seeded Gaussian noise of this many component standard deviations to each mean.")
@click.option("--dp-epsilon", type=FiniteFloat(1e-6, 1e6), default=None,
              help="Fit with (epsilon, delta)-differential privacy: unit-norm features, private PCA, DP-EM "
                   "(protocol/gmm.md); smaller is more private.")
@click.option("--dp-delta", type=FiniteFloat(1e-100, 1.0, max_open=True), default=1e-5, show_default=True, help="The delta of --dp-epsilon.")
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
    """Fit a Gaussian mixture to EXTRACTOR features of the private dataset --data.

    Runs on the device, offline. Features are standardised and PCA-projected (the
    projection travels inside the artifact), one mixture is fitted per K and the lowest
    BIC among those that keep every per-component privacy guarantee wins (each
    component supported by enough samples, a variance well above the regulariser, a
    mean away from every private sample). The artifact holds only the mixture, the
    projection and aggregate provenance (extractor fingerprint, sample count, BIC per K,
    timings): no image, label, feature vector or per-sample value, and not the --data
    reference either. A fit that cannot keep the guarantees is refused (exit 2; see
    protocol/gmm.md). With --dp-epsilon the mixture is differentially private instead,
    and the budget spent is recorded in the artifact.

    Example: tapvits fit-gmm --data "fashion-mnist:split=train:classes=0,1:fold=0/2"
    --extractor base.safetensors -o device.gmm.safetensors
    """
    from tapvits_cli.cli.stage_call import run_stage
    from tapvits_cli.stages import fit_gmm

    result = run_stage(fit_gmm)
    emit(result.document, result.output)
