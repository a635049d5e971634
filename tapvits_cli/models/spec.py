"""The architecture description a model artifact carries, so it reloads with nothing else.

A spec is plain data (no torch): the timm architecture name and keyword arguments, the
family that knows its prunable units, the per-block widths (which differ from the
architecture's defaults once a model is pruned), its preprocessing, its classes and its
token merging setting (:class:`TokenMerging`; ``models/token_merging.py`` installs it on a
module, with torch). How a spec is written into a model artifact's metadata is
``artifacts/model.py``'s business: this module knows no file format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from tapvits_cli.errors import UsageError
from tapvits_cli.vocabulary import MERGE_METHODS

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
class MergeStep:
    """What one block's merge does, fixed by the input size: ``amount`` (tokens or line pairs),
    the tokens it leaves (prefix included), the patch grid it starts from and its axis (neighbour)."""

    amount: int
    tokens_out: int
    grid: tuple[int, int]
    axis: str   # "columns" or "rows" for neighbour merging, "" for bipartite


@dataclass(frozen=True)
class TokenMerging:
    """A model's token-merging setting: method, per-block amount, proportional attention."""

    method: str
    schedule: tuple[int, ...]
    proportional_attention: bool = True

    def __post_init__(self):
        if self.method not in MERGE_METHODS:
            raise UsageError(f"unknown token-merging method '{self.method}'; choose one of {', '.join(MERGE_METHODS)}")
        if any(not isinstance(amount, int) or isinstance(amount, bool) or amount < 0 for amount in self.schedule):
            raise UsageError(f"token-merging amounts must be integers >= 0, got {list(self.schedule)}")

    @classmethod
    def uniform(cls, method: str, amount: int, blocks: int, layers: Sequence[int] | None = None,
                proportional_attention: bool = True) -> "TokenMerging":
        """``amount`` in each block of ``layers`` (default: every block), 0 elsewhere."""
        chosen = set(range(blocks) if layers is None else layers)
        outside = sorted(layer for layer in chosen if not 0 <= layer < blocks)
        if outside:
            raise UsageError(f"token-merging layers {outside} do not exist: the model has blocks 0-{blocks - 1}")
        return cls(method, tuple(amount if block in chosen else 0 for block in range(blocks)), proportional_attention)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "schedule": list(self.schedule),
                "proportional_attention": self.proportional_attention}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> "TokenMerging":
        """The inverse of :meth:`to_dict`; ``ValueError`` for anything malformed."""
        if not isinstance(record, Mapping) or set(record) - {"method", "schedule", "proportional_attention"} \
                or not isinstance(record.get("schedule"), list) \
                or not isinstance(record.get("proportional_attention", True), bool):
            raise ValueError("expected {method, schedule: [integers], proportional_attention: boolean}")
        try:
            return cls(str(record.get("method")), tuple(record["schedule"]),
                       record.get("proportional_attention", True))
        except UsageError as exc:
            raise ValueError(str(exc)) from None

    def steps(self, grid: tuple[int, int], prefix: int) -> tuple[MergeStep, ...]:
        """Per block, what its merge does on a ``grid`` of patches after ``prefix`` tokens.

        Raises :class:`UsageError` when a block would merge more than half of its patch
        tokens (bipartite) or of its grid lines (neighbour).
        """
        height, width = grid
        steps = []
        for block, amount in enumerate(self.schedule):
            if self.method == "bipartite":
                patches = height * width
                if amount > patches // 2:
                    raise UsageError(f"block {block}: bipartite merging removes at most half of the {patches} patch "
                                     f"tokens left ({patches // 2}), not {amount}: lower the amount")
                steps.append(MergeStep(amount, prefix + patches - amount, (height, width), ""))
                height, width = 1, patches - amount   # no grid after a bipartite merge: a row of tokens
                continue
            axis = "columns" if width >= height else "rows"
            lines = width if axis == "columns" else height
            if amount > lines // 2:
                raise UsageError(f"block {block}: neighbour merging joins at most {lines // 2} pairs of the {lines} "
                                 f"{axis} of the {height}x{width} grid, not {amount}: lower the amount")
            steps.append(MergeStep(amount, prefix + (height * (width - amount) if axis == "columns"
                                                     else (height - amount) * width), (height, width), axis))
            width, height = (width - amount, height) if axis == "columns" else (width, height - amount)
        return tuple(steps)

    def token_counts(self, grid: tuple[int, int], prefix: int) -> tuple[int, ...]:
        """Tokens leaving each block (what its MLP and the next block see), prefix tokens included."""
        return tuple(step.tokens_out for step in self.steps(grid, prefix))


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
