"""``tapvits score``: model + public pool + metric set → per-unit and per-layer importance."""

from __future__ import annotations

import math
from pathlib import Path

import click

from tapvits_cli.cli.options import CURRENT, FiniteFloat, WritingCommand, global_options
from tapvits_cli.cli.output import emit, log, progress_bar
from tapvits_cli.errors import IncompatibleArtifactError, UsageError
from tapvits_cli.vocabulary import BUDGET_FRACTION, CRITERIA, DEFAULT_CRITERION

DEFAULT_PROBE_FRACTION = 0.3   # = 1 − the usual 0.7 budget


def parse_weights(text: str, option: str) -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` → (α, β, γ): three finite non-negative numbers with a positive sum."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and v >= 0 for v in values) or sum(values) <= 0:
        raise UsageError(f"{option} needs three finite non-negative numbers α,β,γ with a positive sum, e.g. 0.8,0.1,0.1; got '{text}'")
    return values


@click.command("score", cls=WritingCommand, short_help="Score every MLP neuron and attention head on a metric set.")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--metric-set", "metric_set_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Metric set from `tapvits select`; its first metric_size samples are scored.")
@click.option("--pool", help="Dataset reference of the public pool the metric set indexes "
                             "[default: the reference the metric set records]; its fingerprint must match.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Scores artifact to write (.safetensors).")
@click.option("--criterion", type=click.Choice(CRITERIA), default=DEFAULT_CRITERION,
              show_default=True, help="composite: activity/redundancy/HSIC relevance (METHOD.md); baselines: L1 weight "
                                      "magnitude, |weight × gradient| of the labels' cross-entropy, seeded random.")
@click.option("--mlp-weights", default="0.8,0.1,0.1", show_default=True, metavar="α,β,γ",
              help="Composite weights of activity, (1 − redundancy), relevance for MLP neurons.")
@click.option("--attn-weights", default="0.1,0.1,0.8", show_default=True, metavar="α,β,γ",
              help="Composite weights for attention heads.")
@click.option("--probe-fraction", type=FiniteFloat(0, 1, min_open=True), metavar="S",
              help=f"Fraction of each layer's lowest-scoring units removed by its KL probe [default: {DEFAULT_PROBE_FRACTION}].")
@click.option("--budget", type=FiniteFloat.within(BUDGET_FRACTION), metavar="B",
              help="The budget the plan will be made for: probe with S = 1 − B (exclusive with --probe-fraction).")
@click.option("--no-layer-importance", is_flag=True, help="Skip the KL probes (the kl allocation strategy then cannot be used).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images per forward pass (results do not depend on it).")
@click.option("--hsic-batch", type=click.IntRange(min=2), default=64, show_default=True,
              help="Samples per HSIC mini-batch (consecutive metric-set samples, independent of --batch-size).")
@click.option("--max-samples", type=click.IntRange(min=2), help="Score only the first N samples of the metric set.")
@global_options
def command(model: str, metric_set_path: str, pool: str | None, output: str, criterion: str, mlp_weights: str,
            attn_weights: str, probe_fraction: float | None, budget: float | None, no_layer_importance: bool,
            batch_size: int, hsic_batch: int, max_samples: int | None) -> None:
    """Score every MLP neuron and attention head of MODEL on the metric set, and every layer by KL.

    Per unit: activity, redundancy, task relevance and their composite (or a baseline
    criterion); per block and unit type: KL(intact ‖ probed) when the layer's lowest-scoring
    fraction S is removed. Writes a scores artifact for `tapvits allocate`. MODEL is a timm
    ViT/DeiT (family vit) or Swin (family swin, blocks numbered across stages); any other
    model is refused.

    Example: tapvits score base.safetensors --metric-set device.metric.h5 --budget 0.7
    -o device.scores.safetensors
    """
    import numpy as np
    import torch

    from tapvits_cli.artifacts.files import sha256_file
    from tapvits_cli.artifacts.header import LineageEntry
    from tapvits_cli.artifacts.metric_set import read_metric_set
    from tapvits_cli.artifacts.model import load_model, model_record
    from tapvits_cli.artifacts.scores import write_scores
    from tapvits_cli.data import open_dataset
    from tapvits_cli.data.preprocess import Preprocessing
    from tapvits_cli.importance.samples import SampleSet
    from tapvits_cli.importance.scoring import ScoreConfig, planned_steps, score_model
    from tapvits_cli.models.families import family_module
    from tapvits_cli.runtime import resolve_device, seed_everything

    if probe_fraction is not None and budget is not None:
        raise UsageError("--probe-fraction and --budget are exclusive: the probe fraction is 1 − budget")
    if no_layer_importance and (probe_fraction is not None or budget is not None):
        raise UsageError("--no-layer-importance skips the probes: drop --probe-fraction/--budget")
    if budget == BUDGET_FRACTION.high:
        raise UsageError(f"--budget {budget:g} keeps every unit, so the KL probes would remove nothing: "
                         "give a budget below 1 or --no-layer-importance")
    fraction = None if no_layer_importance else (
        probe_fraction if probe_fraction is not None else 1 - budget if budget is not None else DEFAULT_PROBE_FRACTION)
    weights = {"mlp": parse_weights(mlp_weights, "--mlp-weights"), "attn": parse_weights(attn_weights, "--attn-weights")}
    seed_everything(CURRENT.seed)
    device = resolve_device(CURRENT.device)

    metric_set = read_metric_set(metric_set_path)
    dataset = open_dataset(pool or metric_set.pool["reference"])
    if dataset.fingerprint() != metric_set.pool["fingerprint"]:
        raise IncompatibleArtifactError(
            f"{metric_set_path} indexes the pool '{metric_set.pool['reference']}' (fingerprint "
            f"{metric_set.pool['fingerprint'][:12]}), but '{dataset.ref}' has fingerprint {dataset.fingerprint()[:12]}: "
            "pass the pool the metric set was selected from")
    network, spec, model_artifact = load_model(model, device=device)
    family_module(spec.family, spec.architecture)   # a generic model is refused, naming the supported families
    ids = metric_set.metric_ids[:max_samples] if max_samples else metric_set.metric_ids
    positions = metric_set.positions_in(dataset, ids)
    labels = dataset.labels[positions]
    if criterion == "taylor" and labels.max(initial=0) >= spec.num_classes:
        raise UsageError(f"the taylor criterion needs pool labels below the model's {spec.num_classes} classes; "
                         f"the metric set has label {int(labels.max())}")
    preprocessing = Preprocessing.from_dict(spec.preprocessing)

    def load(indices):
        return preprocessing(torch.from_numpy(dataset.images(positions[indices])).to(device))

    samples = SampleSet(count=len(positions), load=load, labels=labels)
    config = ScoreConfig(criterion=criterion, weights=weights, probe_fraction=fraction, batch_size=batch_size,
                         hsic_batch=hsic_batch, seed=CURRENT.seed)
    with progress_bar(f"scoring ({criterion})", total=planned_steps(samples, len(spec.blocks), config)) as advance:
        result = score_model(network, samples, config, on_progress=advance)

    recorded_weights = weights if criterion == "composite" else None
    params = {"criterion": criterion, "weights": recorded_weights, "probe_fraction": fraction,
              "batch_size": batch_size, "hsic_batch": hsic_batch, "max_samples": max_samples,
              "seed": CURRENT.seed, "device": device}
    inputs = {
        "model": LineageEntry(sha256_file(model), "model", Path(model).name),
        "metric-set": LineageEntry(sha256_file(metric_set_path), "metric-set", Path(metric_set_path).name),
        "pool": LineageEntry(dataset.fingerprint(), "dataset", str(dataset.ref)),
    }
    record = model_record(spec, model_artifact.metadata["model.weights_sha256"])
    path = write_scores(output, result.layers, result.layer_importance, criterion, record, samples.count, fraction,
                        recorded_weights, params, inputs)
    seconds = {k: round(v, 3) for k, v in result.seconds.items()}
    log(f"{criterion} scores of {len(spec.blocks)} blocks on {samples.count} samples: statistics "
        f"{seconds['statistics']:.1f} s, KL probes {seconds['probes']:.1f} s", level=1)
    importance = {k: np.round(v, 6).tolist() for k, v in (result.layer_importance or {}).items()}
    emit({"output": str(path), "kind": "scores", "criterion": criterion, "samples": samples.count,
          "probe_fraction": fraction, "layer_importance": importance or None, "seconds": seconds}, str(path))
