"""``score``: a model + the public pool + a metric set → per-unit and per-layer importance."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tapvits_cli.errors import InvalidArtifactError, UsageError
from tapvits_cli.stages.common import (Written as Result, argument, artifact_lineage, dataset_lineage,
                                       open_selected_pool, option)
from tapvits_cli.stages.feedback import log, progress
from tapvits_cli.vocabulary import BUDGET_FRACTION, DEFAULT_CRITERION

DEFAULT_PROBE_FRACTION = 0.3   # = 1 − the usual 0.7 budget


@dataclass(frozen=True, kw_only=True)
class Options:
    model: str = argument()
    metric_set_path: str = option("--metric-set", recipe=False)
    data: str | None = option("--data", recipe=False)   # default: the pool the metric set records
    output: str = option("-o", recipe=False)
    criterion: str = option("--criterion", DEFAULT_CRITERION)
    mlp_weights: str = option("--mlp-weights", "0.8,0.1,0.1")
    attn_weights: str = option("--attn-weights", "0.1,0.1,0.8")
    probe_fraction: float | None = option("--probe-fraction")
    budget: float | None = option("--budget", recipe=False)   # a recipe's budget is the run's
    no_layer_importance: bool = option("--no-layer-importance", False)
    batch_size: int = option("--batch-size", 64)
    hsic_batch: int = option("--hsic-batch", 64)
    max_samples: int | None = option("--max-samples")
    seed: int = 0
    device: str = "auto"


def parse_weights(text: str, option: str) -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` → (α, β, γ): three finite non-negative numbers with a positive sum, scaled to sum 1.

    Only their proportions rank units; unscaled, ``1e39,0,0`` made every score overflow
    float32 (an artifact ``validate`` refused, written with exit 0) and ``1e-320,0,0``
    made every score 0. Divided by the largest first, so the sum cannot overflow.
    """
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and v >= 0 for v in values) or sum(values) <= 0:
        raise UsageError(f"{option} needs three finite non-negative numbers α,β,γ with a positive sum, e.g. 0.8,0.1,0.1; got '{text}'")
    relative = tuple(v / max(values) for v in values)
    return tuple(v / sum(relative) for v in relative)


def run(options: Options) -> Result:
    import numpy as np
    import torch

    from tapvits_cli.artifacts.metric_set import read_metric_set
    from tapvits_cli.artifacts.model import load_model, model_record
    from tapvits_cli.artifacts.scores import write_scores
    from tapvits_cli.data.preprocess import Preprocessing
    from tapvits_cli.importance.samples import SampleSet
    from tapvits_cli.importance.scoring import ScoreConfig, planned_steps, score_model
    from tapvits_cli.models.families import family_module
    from tapvits_cli.runtime import resolve_device, seed_everything

    model, metric_set_path, output = options.model, options.metric_set_path, options.output
    criterion, probe_fraction, budget = options.criterion, options.probe_fraction, options.budget
    no_layer_importance, max_samples = options.no_layer_importance, options.max_samples
    batch_size, hsic_batch = options.batch_size, options.hsic_batch
    mlp_weights, attn_weights = options.mlp_weights, options.attn_weights
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
    seed_everything(options.seed)
    device = resolve_device(options.device)

    metric_set = read_metric_set(metric_set_path)
    dataset = open_selected_pool(options.data, metric_set, metric_set_path)
    loaded = load_model(model, device=device)
    network, spec = loaded.module, loaded.spec
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
                         hsic_batch=hsic_batch, seed=options.seed)
    with progress(f"scoring ({criterion})", total=planned_steps(samples, len(spec.blocks), config)) as advance:
        result = score_model(network, samples, config, on_progress=advance)

    overflowed = sum(int((~np.isfinite(np.asarray(array, dtype=np.float32))).sum())
                     for layer in result.layers for array in layer.values.values())
    if overflowed:   # stored as float32: a finite float64 score beyond 3.4e38 would be infinite in the file
        raise InvalidArtifactError(f"{model}: {overflowed:,} unit scores are not finite in float32 (NaN, or beyond "
                                   "3.4e38): the model's activations overflow on the metric set")
    recorded_weights = weights if criterion == "composite" else None
    params = {"criterion": criterion, "weights": recorded_weights, "probe_fraction": fraction,
              "batch_size": batch_size, "hsic_batch": hsic_batch, "max_samples": max_samples,
              "seed": options.seed, "device": device}
    inputs = {"model": artifact_lineage(model, "model"), "metric-set": artifact_lineage(metric_set_path, "metric-set"),
              "pool": dataset_lineage(dataset)}
    record = model_record(spec, loaded.artifact.metadata["model.weights_sha256"])
    path = write_scores(output, result.layers, result.layer_importance, criterion, record, samples.count, fraction,
                        recorded_weights, params, inputs)
    seconds = {k: round(v, 3) for k, v in result.seconds.items()}
    log(f"{criterion} scores of {len(spec.blocks)} blocks on {samples.count} samples: statistics "
        f"{seconds['statistics']:.1f} s, KL probes {seconds['probes']:.1f} s", level=1)
    importance = {k: np.round(v, 6).tolist() for k, v in (result.layer_importance or {}).items()}
    return Result(str(path), {"output": str(path), "kind": "scores", "criterion": criterion, "samples": samples.count,
          "probe_fraction": fraction, "layer_importance": importance or None, "seconds": seconds})
