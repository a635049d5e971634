"""The ``plan`` artifact: which MLP neurons and heads each block keeps, and what that achieves.

See protocol/plan.md. Tensors ``blocks.{l}.attn.keep`` and ``blocks.{l}.mlp.keep`` hold
the sorted indices of the kept units; the metadata records the budget it was made for,
the parameters and MACs it achieves (whole model), the strategy, and the base model it
applies to (``plan.model``), so ``prune`` can refuse any other model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from tapvits_cli.artifacts.containers import ArtifactFile, load_safetensors, write_safetensors
from tapvits_cli.artifacts.header import Header, LineageEntry, compact_json, finite_number
from tapvits_cli.artifacts.kinds import KindSpec, Summary, Table, bar, read_artifact, register
from tapvits_cli.artifacts.model import record_spec
from tapvits_cli.errors import InvalidArtifactError
from tapvits_cli.models.spec import BlockWidths, ModelSpec
from tapvits_cli.vocabulary import ALLOCATION_STRATEGIES, BUDGET_KINDS, UNIT_KINDS

KIND = "plan"
VERSION = 1
_REQUIRED_KEYS = ("strategy", "budget", "achieved", "base", "model", "scores_sha256")


@dataclass(frozen=True)
class Plan:
    keep: Mapping[str, tuple[np.ndarray, ...]]   # unit kind -> per block, sorted kept indices (int64)
    strategy: str
    budget: Mapping[str, Any]                    # {"kind": "params"|"macs", "value": fraction}
    achieved: Mapping[str, Any]                  # {"params", "params_fraction", "macs", "macs_fraction"}
    base: Mapping[str, int]                      # {"params", "macs"} of the unpruned model
    model: Mapping[str, Any]                     # plan.model record of the base model
    scores_sha256: str
    artifact: ArtifactFile

    @property
    def mlp_keep(self) -> tuple[np.ndarray, ...]:
        return self.keep["mlp"]

    @property
    def attn_keep(self) -> tuple[np.ndarray, ...]:
        return self.keep["attn"]

    @property
    def base_spec(self) -> ModelSpec:
        """Architecture of the model the plan applies to (no preprocessing or classes)."""
        return record_spec(self.model, str(self.artifact.path))

    @property
    def base_blocks(self) -> tuple[BlockWidths, ...]:
        return self.base_spec.blocks

    @property
    def pruned_blocks(self) -> tuple[BlockWidths, ...]:
        """Per-block widths after the plan (0 heads or 0 neurons: that branch is removed)."""
        return tuple(BlockWidths(len(attn), widths.head_dim, len(mlp))
                     for widths, attn, mlp in zip(self.base_blocks, self.attn_keep, self.mlp_keep))

    @property
    def model_sha256(self) -> str:
        """``model.weights_sha256`` of the base model (content hash: a re-saved copy still matches)."""
        return self.model["weights_sha256"]


def write_plan(path: str | os.PathLike, keep: Mapping[str, Sequence[Any]], strategy: str,
               budget: Mapping[str, Any], achieved: Mapping[str, Any], base: Mapping[str, int],
               model: Mapping[str, Any], scores_sha256: str, params: Mapping[str, Any],
               inputs: Mapping[str, LineageEntry]):
    """``keep`` maps each unit kind to the kept unit indices per block, as :attr:`Plan.keep` reads them back."""
    import torch

    tensors = {f"blocks.{block}.{kind}.keep": torch.as_tensor(np.sort(np.asarray(indices, dtype=np.int64)))
               for kind, per_block in keep.items() for block, indices in enumerate(per_block)}
    metadata = {
        f"{KIND}.strategy": strategy,
        f"{KIND}.budget": compact_json(dict(budget)),
        f"{KIND}.achieved": compact_json(dict(achieved)),
        f"{KIND}.base": compact_json(dict(base)),
        f"{KIND}.model": compact_json(dict(model)),
        f"{KIND}.scores_sha256": scores_sha256,
    }
    header = Header(kind=KIND, version=VERSION, inputs=dict(inputs), params=dict(params))
    return write_safetensors(path, tensors, header, metadata)


def read_plan(path: str | os.PathLike) -> Plan:
    """Read and check a plan: every rule of protocol/plan.md, the same as ``validate``."""
    artifact = read_artifact(path, expect=KIND)
    plan = _parse(artifact, load_safetensors(artifact))
    _check_costs(plan)
    return plan


def _parse(artifact: ArtifactFile, tensors: Mapping[str, Any]) -> Plan:
    source, fail = str(artifact.path), artifact.fail
    artifact.require_keys(KIND, _REQUIRED_KEYS)
    strategy = artifact.metadata[f"{KIND}.strategy"]
    if strategy not in ALLOCATION_STRATEGIES:
        raise fail(f"unknown strategy '{strategy}' (known: {', '.join(ALLOCATION_STRATEGIES)})")
    budget = artifact.json_field(f"{KIND}.budget")
    if not isinstance(budget, dict) or budget.get("kind") not in BUDGET_KINDS \
            or not finite_number(budget.get("value")) or not 0 < budget["value"] <= 1:
        raise fail(f"'{KIND}.budget' must be {{\"kind\": params|macs, \"value\": a fraction in (0, 1]}}")
    achieved, base = artifact.json_field(f"{KIND}.achieved"), artifact.json_field(f"{KIND}.base")
    if not isinstance(achieved, dict) or not all(finite_number(achieved.get(k)) for k in
                                                 ("params", "params_fraction", "macs", "macs_fraction")):
        raise fail(f"'{KIND}.achieved' must hold params, params_fraction, macs and macs_fraction")
    if not isinstance(base, dict) or not all(isinstance(base.get(k), int) and not isinstance(base[k], bool)
                                             and base[k] > 0 for k in ("params", "macs")):
        raise fail(f"'{KIND}.base' must hold positive integer params and macs")
    model = artifact.json_field(f"{KIND}.model")
    blocks = record_spec(model, source).blocks
    keep: dict[str, list[np.ndarray]] = {kind: [] for kind in UNIT_KINDS}
    for index, widths in enumerate(blocks):
        for kind in UNIT_KINDS:
            name, units = f"blocks.{index}.{kind}.keep", widths.units(kind)
            info = artifact.tensors.get(name)
            if info is None:
                raise fail(f"tensor '{name}' is missing")
            if info.dtype != "I64" or len(info.shape) != 1:
                raise fail(f"tensor '{name}' must be a 1-D I64 vector, is {info.dtype} {list(info.shape)}")
            indices = tensors[name].numpy()
            if len(indices) and (indices[0] < 0 or indices[-1] >= units or (np.diff(indices) <= 0).any()):
                raise fail(f"tensor '{name}' must hold strictly increasing unit indices in 0..{units - 1}")
            keep[kind].append(indices)
    return Plan(keep={k: tuple(v) for k, v in keep.items()}, strategy=strategy, budget=budget, achieved=achieved,
                base=base, model=model, scores_sha256=artifact.metadata[f"{KIND}.scores_sha256"], artifact=artifact)


def _validate(artifact: ArtifactFile) -> None:
    """Structure, then the recorded costs against the base architecture's own accounting."""
    _check_costs(_parse(artifact, load_safetensors(artifact)))


def _check_costs(plan: Plan) -> None:
    """The recorded parameters and MACs must be what the kept units cost (the base built on ``meta``), and
    the plan must meet its own budget within its ``tolerance``: a plan that keeps every unit under a 0.7
    budget would otherwise prune nothing and still be labelled 0.7 in every later artifact."""
    from tapvits_cli.models.factory import cost_model

    artifact = plan.artifact
    cost = cost_model(plan.base_spec, source=str(artifact.path))
    counts = [len(plan.keep[layer.kind][layer.block]) for layer in cost.layers]
    expected = {"params": cost.params(counts), "macs": cost.macs(counts)}
    full = {"params": cost.params(cost.units), "macs": cost.macs(cost.units)}
    for key in ("params", "macs"):
        if plan.base[key] != full[key] or plan.achieved[key] != expected[key]:
            raise InvalidArtifactError(
                f"{artifact.path}: recorded {key} ({plan.achieved[key]} of {plan.base[key]}) differ from what the "
                f"kept units cost ({expected[key]} of {full[key]})")
        if abs(plan.achieved[f"{key}_fraction"] - expected[key] / full[key]) > 1e-12:
            raise InvalidArtifactError(f"{artifact.path}: recorded {key}_fraction {plan.achieved[f'{key}_fraction']} "
                                       f"is not {expected[key]} / {full[key]}")
    tolerance = artifact.header.params.get("tolerance")
    if not finite_number(tolerance) or not 0 <= tolerance < 1:
        raise InvalidArtifactError(f"{artifact.path}: tapvits.params must hold the tolerance, a number in [0, 1)")
    kind, target = plan.budget["kind"], plan.budget["value"] * full[plan.budget["kind"]]
    if abs(expected[kind] - target) > tolerance * target * (1 + 1e-9):
        raise InvalidArtifactError(f"{artifact.path}: keeps {expected[kind] / full[kind]:.4f} of the {kind}, further "
                                   f"than its tolerance {tolerance:g} from its budget {plan.budget['value']:g}")


def _summarize(artifact: ArtifactFile) -> Summary:
    plan = _parse(artifact, load_safetensors(artifact))
    achieved = plan.achieved
    figures = {
        "strategy": plan.strategy,
        "budget": f"{plan.budget['value']:g} of the {'parameters' if plan.budget['kind'] == 'params' else 'MACs'}",
        "params": f"{achieved['params']:,} of {plan.base['params']:,} ({achieved['params_fraction']:.4f})",
        "macs": f"{achieved['macs']:,} of {plan.base['macs']:,} ({achieved['macs_fraction']:.4f})",
        "architecture": plan.model["architecture"],
        "model_weights_sha256": plan.model_sha256,
        "scores_sha256": plan.scores_sha256,
    }
    rows = []
    for index, (base, pruned) in enumerate(zip(plan.base_blocks, plan.pruned_blocks)):
        head_ratio, mlp_ratio = pruned.heads / base.heads, pruned.mlp_hidden / base.mlp_hidden
        rows.append([index, f"{pruned.heads}/{base.heads}", head_ratio, bar(head_ratio),
                     f"{pruned.mlp_hidden}/{base.mlp_hidden}", mlp_ratio, bar(mlp_ratio)])
    columns = ["block", "heads", "attn keep", "attn bar", "mlp neurons", "mlp keep", "mlp bar"]
    return Summary(figures=figures, tables=[Table("kept units per block", columns, rows)])


SPEC = register(KindSpec(
    name=KIND, format="safetensors", version=VERSION, validate=_validate, summarize=_summarize,
    description="a pruning plan: kept MLP neurons and attention heads per block, the budget and what it achieves",
))
