"""The architecture description a model artifact carries, so it reloads with nothing else.

A spec is plain data (no torch): the timm architecture name and keyword arguments, the
family that knows its prunable units, the per-block widths (which differ from the
architecture's defaults once a model is pruned), its preprocessing, its classes and its
token merging (``models/token_merging.py``, which needs torch: it is imported only for a
spec that has one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from tapvits_cli.artifacts.header import compact_json
from tapvits_cli.errors import InvalidArtifactError

if TYPE_CHECKING:
    from tapvits_cli.models.token_merging import TokenMerging

NAMESPACE = "model"


@dataclass(frozen=True)
class BlockWidths:
    """Width of one transformer block's prunable branches."""

    heads: int
    head_dim: int
    mlp_hidden: int

    def to_dict(self) -> dict[str, int]:
        return {"heads": self.heads, "head_dim": self.head_dim, "mlp_hidden": self.mlp_hidden}

    def units(self, kind: str) -> int:
        """Prunable units of one type: ``attn`` heads or ``mlp`` neurons (see models/units.py)."""
        return {"attn": self.heads, "mlp": self.mlp_hidden}[kind]


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    kwargs: Mapping[str, Any]
    family: str
    blocks: tuple[BlockWidths, ...]
    preprocessing: Mapping[str, Any]
    num_classes: int
    class_names: tuple[str, ...] | None = None
    extra: Mapping[str, str] = field(default_factory=dict)
    token_merging: TokenMerging | None = None

    def to_metadata(self, parameters: int, weights_sha256: str) -> dict[str, str]:
        meta = {
            "model.architecture": self.architecture,
            "model.kwargs": compact_json(dict(self.kwargs)),
            "model.family": self.family,
            "model.blocks": compact_json([b.to_dict() for b in self.blocks]),
            "model.preprocessing": compact_json(dict(self.preprocessing)),
            "model.num_classes": str(self.num_classes),
            "model.parameters": str(parameters),
            "model.weights_sha256": weights_sha256,
        }
        if self.class_names is not None:
            meta["model.class_names"] = compact_json(list(self.class_names))
        if self.token_merging is not None:
            meta["model.token_merging"] = compact_json(self.token_merging.to_dict())
        return meta

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], source: str) -> "ModelSpec":
        def field_(key: str, parse=json.loads):
            if f"model.{key}" not in meta:
                raise InvalidArtifactError(f"{source}: required key 'model.{key}' is missing")
            try:
                return parse(meta[f"model.{key}"])
            except (ValueError, TypeError):
                raise InvalidArtifactError(f"{source}: key 'model.{key}' is malformed") from None

        kwargs = field_("kwargs")
        blocks_raw = field_("blocks")
        preprocessing = field_("preprocessing")
        if not isinstance(kwargs, dict) or not isinstance(preprocessing, dict) or not isinstance(blocks_raw, list):
            raise InvalidArtifactError(f"{source}: model.kwargs/preprocessing must be objects, model.blocks a list")
        try:
            blocks = tuple(BlockWidths(int(b["heads"]), int(b["head_dim"]), int(b["mlp_hidden"])) for b in blocks_raw)
        except (KeyError, TypeError, ValueError):
            raise InvalidArtifactError(f"{source}: model.blocks entries need integer heads, head_dim, mlp_hidden") from None
        if any(min(b.heads, b.head_dim, b.mlp_hidden) < 0 for b in blocks):
            raise InvalidArtifactError(f"{source}: model.blocks widths must not be negative")
        names = json.loads(meta["model.class_names"]) if "model.class_names" in meta else None
        merging = None
        if "model.token_merging" in meta:
            from tapvits_cli.models.token_merging import TokenMerging

            try:
                merging = TokenMerging.from_dict(json.loads(meta["model.token_merging"]))
            except ValueError as exc:
                raise InvalidArtifactError(f"{source}: key 'model.token_merging' is malformed ({exc})") from None
        return cls(
            architecture=field_("architecture", str),
            kwargs=kwargs,
            family=field_("family", str),
            blocks=blocks,
            preprocessing=preprocessing,
            num_classes=field_("num_classes", int),
            class_names=tuple(str(n) for n in names) if names is not None else None,
            token_merging=merging,
        )
