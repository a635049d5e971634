"""``tapvits score``: model + public pool + metric set → per-unit and per-layer importance."""

from __future__ import annotations

import click

from tapvits_cli.cli.options import FiniteFloat, WritingCommand, checked_by, global_options
from tapvits_cli.cli.output import emit
from tapvits_cli.stages.score import DEFAULT_PROBE_FRACTION, parse_weights
from tapvits_cli.vocabulary import BUDGET_FRACTION, CRITERIA, DEFAULT_CRITERION


@click.command("score", cls=WritingCommand, renamed={"--pool": "--data"},
               short_help="Score every MLP neuron and attention head on a metric set.")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--metric-set", "metric_set_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Metric set from `tapvits select`; its first metric_size samples are scored.")
@click.option("--data", metavar="REF", help="Dataset reference of the public pool the metric set indexes "
                                         "[default: the reference the metric set records]; its fingerprint must match.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Scores artifact to write (.safetensors).")
@click.option("--criterion", type=click.Choice(CRITERIA), default=DEFAULT_CRITERION,
              show_default=True, help="output-norm: RMS of what the unit writes through fc2/proj on the metric set (no labels; "
                                      "the default since the partitions benchmark); composite: the paper's activity/"
                                      "redundancy/HSIC relevance; baselines: L1 weight magnitude, |weight × gradient| "
                                      "of the labels' cross-entropy, seeded random.")
@click.option("--mlp-weights", default="0.8,0.1,0.1", show_default=True, metavar="α,β,γ",
              callback=checked_by(lambda text: parse_weights(text, "--mlp-weights")),
              help="Composite weights of activity, (1 − redundancy), relevance for MLP neurons (scaled to sum 1: "
                   "only their proportions count).")
@click.option("--attn-weights", default="0.1,0.1,0.8", show_default=True, metavar="α,β,γ",
              callback=checked_by(lambda text: parse_weights(text, "--attn-weights")),
              help="Composite weights for attention heads.")
@click.option("--probe-fraction", type=FiniteFloat(0, 1, min_open=True), metavar="S",
              help=f"Fraction of each layer's lowest-scoring units removed by its KL probe [default: {DEFAULT_PROBE_FRACTION}].")
@click.option("--budget", type=FiniteFloat.within(BUDGET_FRACTION), metavar="B",
              help="The budget the plan will be made for: probe with S = 1 − B (exclusive with --probe-fraction).")
@click.option("--no-layer-importance", is_flag=True,
              help="Skip the KL probes (the kl and kl-power allocation strategies then cannot be used).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images per forward pass (results do not depend on it).")
@click.option("--hsic-batch", type=click.IntRange(min=2), default=64, show_default=True,
              help="Samples per HSIC mini-batch (consecutive metric-set samples, independent of --batch-size).")
@click.option("--max-samples", type=click.IntRange(min=2), help="Score only the first N samples of the metric set.")
@global_options
def command(model: str, metric_set_path: str, data: str | None, output: str, criterion: str, mlp_weights: str,
            attn_weights: str, probe_fraction: float | None, budget: float | None, no_layer_importance: bool,
            batch_size: int, hsic_batch: int, max_samples: int | None) -> None:
    """Score every MLP neuron and attention head of MODEL on the metric set, and every layer by KL.

    Per unit: the RMS of what it writes into the residual stream (output-norm), or the
    paper's composite of activity, redundancy and task relevance, or a baseline criterion;
    per block and unit type: KL(intact ‖ probed) when the layer's lowest-scoring fraction S
    is removed. Writes a scores artifact for `tapvits allocate`. MODEL is a timm
    ViT/DeiT (family vit) or Swin (family swin, blocks numbered across stages); any other
    model is refused.

    Example: tapvits score base.safetensors --metric-set device.metric.h5 --budget 0.7
    -o device.scores.safetensors
    """
    from tapvits_cli.cli.stage_call import run_stage
    from tapvits_cli.stages import score

    result = run_stage(score)
    emit(result.document, result.output)
