"""``tapvits select``: a device's GMM + the public pool → the metric set and fine-tuning set."""

from __future__ import annotations

import click

from tapvits_cli.cli.extractor import EXTRACTOR_HELP
from tapvits_cli.cli.options import FiniteFloat, WritingCommand, global_options
from tapvits_cli.cli.output import emit
from tapvits_cli.vocabulary import DEFAULT_SELECTION_STRATEGY, MAX_PRIOR_DRAWS, SELECTION_STRATEGIES


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
                   "ratio-stratified: the quotas of stratified, filled by density ratio; class-prior: quotas per "
                   "class of the labelled pool by the device's estimated class shares, filled by density ratio; "
                   "random: seeded uniform sample (ablation).")
@click.option("--public-components", type=click.IntRange(min=1), default=20, show_default=True,
              help="Components of the public-pool mixture (ratio, ratio-stratified and class-prior only; fewer if the "
                   "sample is small).")
@click.option("--public-sample", type=click.IntRange(min=1), default=10000, show_default=True,
              help="Pool rows, a seeded uniform sample, the public mixture (ratio, ratio-stratified, class-prior) "
                   "and class-prior's classifier are fitted on.")
@click.option("--prior-draws", type=click.IntRange(1, MAX_PRIOR_DRAWS), default=20000, show_default=True,
              help="Draws of the device's GMM the class shares are estimated on (class-prior only).")
@click.option("--class-floor", type=FiniteFloat(0.0, 1.0, max_open=True), default=0.0, show_default=True,
              help="Share of the fine-tuning set (class-prior only) spread over every class of the pool in the "
                   "pool's proportions, the rest by the device's estimated shares: a class the device holds but "
                   "its mixture barely shows still gets fine-tuning images (the metric set is unchanged).")
@click.option("--chunk-rows", type=click.IntRange(min=1), default=65536, show_default=True,
              help="Feature-table rows scored at a time (memory stays bounded by this).")
@click.option("-e", "--extractor", "extractor_name", metavar="EXTRACTOR",
              help="Only with a dataset --pool: embeds it on the fly. " + EXTRACTOR_HELP)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images embedded per forward pass (dataset --pool only).")
@global_options
def command(gmm: str, pool: str, output: str, metric_size: int, finetune_size: int, strategy: str,
            public_components: int, public_sample: int, prior_draws: int, class_floor: float,
            chunk_rows: int, extractor_name: str | None,
            batch_size: int) -> None:
    """Score every public sample of POOL under the device's GMM and keep the best.

    Writes one ordered list of pool sample ids: the first --metric-size rows are the
    metric set, all --finetune-size rows the fine-tuning set. The GMM's extractor
    fingerprint must equal the pool's (exit code 4 otherwise). A pool of any size is
    scored in chunks with bounded memory. The ratio strategies first fit a mixture of
    the public pool (--public-sample rows) in the GMM's projection and rank by
    log p_device - log p_public. The class-prior strategy estimates the device's share
    of each class of the labelled pool (EM over draws of the GMM against per-class
    Gaussians of --public-sample pool rows) and fills a quota per class, so classes
    that only look like the device's get none. Reports coverage: how the selected rows' shares per
    mixture component compare with the component weights (1 - total variation).

    Example: tapvits select device.gmm.safetensors --pool pool.h5 -o device.metric.h5
    """
    from tapvits_cli.cli.stage_call import run_stage
    from tapvits_cli.stages import select

    result = run_stage(select)
    emit(result.document, result.output)
