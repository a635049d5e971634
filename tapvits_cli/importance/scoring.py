"""``score_model``: every unit's score with any criterion, then the KL layer importance."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from tapvits_cli.importance.samples import SampleSet
from tapvits_cli.vocabulary import CRITERIA

DEFAULT_WEIGHTS = {"mlp": (0.8, 0.1, 0.1), "attn": (0.1, 0.1, 0.8)}   # (α activity, β redundancy, γ relevance)


@dataclass(frozen=True)
class ScoreConfig:
    criterion: str = "composite"
    weights: Mapping[str, tuple[float, float, float]] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    probe_fraction: float | None = 0.3      # None: no layer importance
    batch_size: int = 64
    hsic_batch: int = 64
    seed: int = 0


@dataclass(frozen=True)
class LayerScores:
    """One layer's per-unit arrays: ``score`` (what allocation ranks by) and, for composite, its parts."""

    block: int
    kind: str
    values: Mapping[str, np.ndarray]


@dataclass(frozen=True)
class ScoreResult:
    layers: tuple[LayerScores, ...]
    layer_importance: Mapping[str, np.ndarray] | None   # kind -> (blocks,) KL in nats
    seconds: Mapping[str, float]   # wall time of "statistics", "probes"; process CPU time of "statistics_cpu", "probes_cpu"


def planned_steps(samples: SampleSet, blocks: int, config: ScoreConfig) -> int:
    """How many times ``score_model`` calls ``on_progress(1)``: once per batch, then once per probed block."""
    probing = config.probe_fraction is not None
    forward_pass = config.criterion in ("composite", "taylor", "output-norm") or probing
    return (len(samples.chunks(config.batch_size)) if forward_pass else 0) + (blocks if probing else 0)


def score_model(model, samples: SampleSet, config: ScoreConfig,
                on_progress: Callable[[int], None] | None = None) -> ScoreResult:
    """Score the units of ``model`` (a prunable family, eval mode) on ``samples``."""
    from tapvits_cli.importance import baselines, composite, output_norm, probes, statistics
    from tapvits_cli.models.families import family_module, family_of

    if config.criterion not in CRITERIA:
        raise ValueError(f"unknown criterion '{config.criterion}'; choose one of {', '.join(CRITERIA)}")
    family = family_module(family_of(model))
    model.eval()
    layers = family.unit_layers(model)
    wants_probes = config.probe_fraction is not None
    started = time.perf_counter(), time.process_time()
    logits = None
    if config.criterion == "composite":
        logits, stats = statistics.collect_statistics(model, layers, samples, config.batch_size, on_progress)
        probabilities = logits.softmax(-1)
        values = [composite.composite_scores(s, probabilities, tuple(config.weights[s.layer.kind]), config.hsic_batch)
                  for s in stats]
    elif config.criterion == "taylor":
        scores, logits = baselines.taylor_scores(model, layers, samples, config.batch_size, on_progress)
        values = [{"score": s} for s in scores]
    elif config.criterion == "output-norm":
        scores, logits = output_norm.output_norm_scores(model, layers, samples, config.batch_size, on_progress)
        values = [{"score": s} for s in scores]
    else:
        scores = baselines.magnitude_scores(layers) if config.criterion == "magnitude" \
            else baselines.random_scores(layers, config.seed)
        values = [{"score": s} for s in scores]
        if wants_probes:
            logits = statistics.model_logits(model, samples, config.batch_size, on_progress)
    measured = time.perf_counter(), time.process_time()
    importance = None
    if wants_probes:
        importance = probes.layer_importance(family.block_sequence(model), layers, [v["score"] for v in values],
                                             samples, logits, config.probe_fraction, config.batch_size, on_progress)
    finished = time.perf_counter(), time.process_time()
    return ScoreResult(
        layers=tuple(LayerScores(layer.block, layer.kind, v) for layer, v in zip(layers, values)),
        layer_importance=importance,
        seconds={"statistics": measured[0] - started[0], "probes": finished[0] - measured[0],
                 "statistics_cpu": measured[1] - started[1], "probes_cpu": finished[1] - measured[1]},
    )
