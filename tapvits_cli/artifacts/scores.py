"""The ``scores`` artifact: per-unit importance and per-layer KL importance, in safetensors.

See protocol/scores.md. Tensors ``blocks.{l}.{attn|mlp}.score`` (what ``allocate`` ranks
by), for the composite criterion also ``.activity``, ``.redundancy``, ``.relevance``, and
``layer_importance.{attn|mlp}``; the model it was computed on is recorded in
``scores.model`` so ``allocate`` can refuse another model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from tapvits_cli.artifacts.containers import ArtifactFile, load_safetensors, write_safetensors
from tapvits_cli.artifacts.header import Header, LineageEntry, compact_json, finite_number, parse_decimal
from tapvits_cli.artifacts.kinds import KindSpec, Summary, Table, bar, read_artifact, register
from tapvits_cli.artifacts.model import record_spec
from tapvits_cli.models.spec import BlockWidths, ModelSpec
from tapvits_cli.vocabulary import CRITERIA, UNIT_KINDS

KIND = "scores"
VERSION = 1
COMPONENTS = ("activity", "redundancy", "relevance")
_REQUIRED_KEYS = ("criterion", "model", "samples", "probe_fraction")


@dataclass(frozen=True)
class Scores:
    criterion: str
    values: Mapping[tuple[int, str], Mapping[str, np.ndarray]]   # (block, kind) -> {"score", components…}
    layer_importance: Mapping[str, np.ndarray] | None             # kind -> (blocks,) KL in nats
    model: Mapping[str, Any]                                      # scores.model record
    blocks: tuple[BlockWidths, ...]
    samples: int
    probe_fraction: float | None
    weights: Mapping[str, list[float]] | None
    artifact: ArtifactFile

    def score(self, block: int, kind: str) -> np.ndarray:
        return self.values[(block, kind)]["score"]

    @property
    def model_spec(self) -> ModelSpec:
        """Architecture of the scored model (no preprocessing or classes): enough for its cost model."""
        return record_spec(self.model, str(self.artifact.path))

    @property
    def model_sha256(self) -> str:
        """``model.weights_sha256`` of the scored model (content hash, independent of the file)."""
        return self.model["weights_sha256"]


def write_scores(path: str | os.PathLike, layers: Sequence[Any], layer_importance: Mapping[str, Any] | None,
                 criterion: str, model: Mapping[str, Any], samples: int, probe_fraction: float | None,
                 weights: Mapping[str, Sequence[float]] | None, params: Mapping[str, Any],
                 inputs: Mapping[str, LineageEntry]):
    """``layers``: objects with ``block``, ``kind`` and ``values`` (name -> array), e.g. a ScoreResult's."""
    import torch

    tensors = {f"blocks.{layer.block}.{layer.kind}.{name}": torch.as_tensor(np.asarray(array, dtype=np.float32))
               for layer in layers for name, array in layer.values.items()}
    for kind, values in (layer_importance or {}).items():
        tensors[f"layer_importance.{kind}"] = torch.as_tensor(np.asarray(values, dtype=np.float32))
    metadata = {
        f"{KIND}.criterion": criterion,
        f"{KIND}.model": compact_json(dict(model)),
        f"{KIND}.samples": str(samples),
        f"{KIND}.probe_fraction": compact_json(probe_fraction),
    }
    if weights is not None:
        metadata[f"{KIND}.weights"] = compact_json({k: list(v) for k, v in weights.items()})
    header = Header(kind=KIND, version=VERSION, inputs=dict(inputs), params=dict(params))
    return write_safetensors(path, tensors, header, metadata)


def read_scores(path: str | os.PathLike) -> Scores:
    """Read and check a scores artifact (every rule of protocol/scores.md)."""
    artifact = read_artifact(path, expect=KIND)
    return _parse(artifact, load_safetensors(artifact))


def _parse(artifact: ArtifactFile, tensors: Mapping[str, Any]) -> Scores:
    source, fail = str(artifact.path), artifact.fail
    artifact.require_keys(KIND, _REQUIRED_KEYS)
    criterion = artifact.metadata[f"{KIND}.criterion"]
    if criterion not in CRITERIA:
        raise fail(f"unknown criterion '{criterion}' (known: {', '.join(CRITERIA)})")
    model = artifact.json_field(f"{KIND}.model")
    blocks = record_spec(model, source).blocks
    probe_fraction = artifact.json_field(f"{KIND}.probe_fraction")
    if probe_fraction is not None and not (finite_number(probe_fraction) and 0 <= probe_fraction <= 1):
        raise fail(f"'{KIND}.probe_fraction' must be null or a number in [0, 1]")
    try:
        samples = parse_decimal(artifact.metadata[f"{KIND}.samples"])
    except ValueError:
        samples = 0
    if samples < 1:
        raise fail(f"'{KIND}.samples' must be a positive integer, got {artifact.metadata[f'{KIND}.samples']!r}")
    weights = None
    if criterion == "composite":
        weights = artifact.json_field(f"{KIND}.weights")
        if not isinstance(weights, dict) or any(
                not isinstance(weights.get(k), list) or len(weights[k]) != 3 for k in UNIT_KINDS):
            raise fail(f"'{KIND}.weights' must map attn and mlp to three numbers")
    names = ("score", *COMPONENTS) if criterion == "composite" else ("score",)
    values: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for index, widths in enumerate(blocks):
        for kind in UNIT_KINDS:
            values[(index, kind)] = {name: _vector(tensors, f"blocks.{index}.{kind}.{name}", widths.units(kind),
                                                   artifact, fail) for name in names}
    importance = None
    if probe_fraction is not None:
        importance = {kind: _vector(tensors, f"layer_importance.{kind}", len(blocks), artifact, fail)
                      for kind in UNIT_KINDS}
    return Scores(criterion=criterion, values=values, layer_importance=importance, model=model, blocks=blocks,
                  samples=samples, probe_fraction=probe_fraction, weights=weights, artifact=artifact)


def _vector(tensors, name: str, length: int, artifact: ArtifactFile, fail) -> np.ndarray:
    """A required F32 vector of ``length`` finite values (non-negative except ``score``)."""
    info = artifact.tensors.get(name)
    if info is None:
        raise fail(f"tensor '{name}' is missing")
    if info.dtype != "F32" or info.shape != (length,):
        raise fail(f"tensor '{name}' must be F32 of shape ({length},), is {info.dtype} {list(info.shape)}")
    array = tensors[name].numpy()
    if not np.isfinite(array).all():
        raise fail(f"tensor '{name}' has non-finite values")
    if not name.endswith(".score") and (array < 0).any():
        raise fail(f"tensor '{name}' has negative values")
    return array


def _validate(artifact: ArtifactFile) -> None:
    _parse(artifact, load_safetensors(artifact))


def _summarize(artifact: ArtifactFile) -> Summary:
    scores = _parse(artifact, load_safetensors(artifact))
    figures = {
        "criterion": scores.criterion,
        "architecture": scores.model["architecture"],
        "model_weights_sha256": scores.model_sha256,
        "samples": scores.samples,
        "probe_fraction": scores.probe_fraction,
    }
    if scores.weights:
        figures["weights"] = scores.weights   # per unit kind: α, β, γ of the composite
    importance = scores.layer_importance
    columns = ["block", "heads", "neurons"]
    columns += ["KL attn", "rel. attn", "KL mlp", "rel. mlp"] if importance is not None else ["mean head score", "mean neuron score"]
    rows = []
    for index, widths in enumerate(scores.blocks):
        row = [index, widths.heads, widths.mlp_hidden]
        for kind in UNIT_KINDS:
            if importance is None:
                row.append(float(scores.score(index, kind).mean()))
            else:
                value, peak = float(importance[kind][index]), float(np.max(importance[kind]))
                row += [value, bar(value / peak if peak > 0 else 0.0)]
        rows.append(row)
    return Summary(figures=figures, tables=[Table("per block", columns, rows)])


SPEC = register(KindSpec(
    name=KIND, format="safetensors", version=VERSION, validate=_validate, summarize=_summarize,
    description="per-unit importance (MLP neurons, attention heads) and per-layer KL importance of a model",
))
