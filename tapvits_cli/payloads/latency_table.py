"""A device's latency table and the latency of a (pruned) model predicted from it.

Pure logic, no torch, no file I/O: the device measures once (``latency/measure.py``,
``tapvits profile``), the cloud predicts the latency of any plan for that device from the
table alone, without the device. That is what latency budgets build on.

The table is additive by construction. A ViT block is a residual attention branch and a
residual MLP branch; the device times three kinds of real, pruned-the-usual-way blocks:

- ``E``: a block whose two branches are both removed (what an emptied branch leaves: the
  block call and ``x + 0`` twice);
- ``A(h)``: a block keeping only its attention, with h heads (its MLP removed);
- ``M(m)``: a block keeping only its MLP, with m hidden neurons (its attention removed).

A block with h heads and m neurons then costs ``E + [h > 0]·(A(h) − E) + [m > 0]·(M(m) − E)``:
each branch adds what it costs over an emptied one, and an emptied branch adds nothing.
The whole model adds the fixed parts, the patch embedding (with position embedding) and
the final norm with the classifier. Head counts are measured at every value 1..H;
MLP widths on a grid, linearly interpolated between grid points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from tapvits_cli.errors import IncompatibleArtifactError, NotImplementedStageError, UsageError
from tapvits_cli.models.spec import BlockWidths, ModelSpec


@dataclass(frozen=True)
class BranchTable:
    """Latency of a block keeping one branch at each measured width.

    ``widths`` strictly increasing, ≥ 1 (heads for attention, hidden neurons for the MLP);
    ``median_ms[i, j]`` the median milliseconds of one such block at ``widths[i]`` on a
    batch of ``batch_sizes[j]`` (the profile's).
    """

    widths: tuple[int, ...]
    median_ms: np.ndarray

    def at(self, widths: np.ndarray, column: int) -> np.ndarray:
        """Latency at each of ``widths`` (within the measured range), linear between grid points."""
        return np.interp(widths, np.asarray(self.widths, dtype=np.float64), self.median_ms[:, column])


@dataclass(frozen=True)
class LatencyProfile:
    """What ``tapvits profile`` measured on one device for one architecture (protocol/profile.md).

    ``model`` is the fingerprint of the unpruned architecture the table was measured for:
    ``{"architecture", "kwargs", "family", "blocks"}`` (``blocks`` as ``model.blocks``), no
    weights, since latency does not depend on their values. Per batch size (aligned with
    ``batch_sizes``): ``embed_ms``, ``head_ms`` and ``block_ms`` (the emptied block ``E``).
    """

    model: Mapping[str, Any]
    runtime: str
    runtime_version: str
    threads: int
    device: str
    cpu: str
    gpu: str | None
    batch_sizes: tuple[int, ...]
    tokens: int
    repeats: int
    warmup: int
    embed_ms: tuple[float, ...]
    head_ms: tuple[float, ...]
    block_ms: tuple[float, ...]
    attn: BranchTable
    mlp: BranchTable

    @property
    def blocks(self) -> tuple[BlockWidths, ...]:
        return tuple(BlockWidths(b["heads"], b["head_dim"], b["mlp_hidden"]) for b in self.model["blocks"])


@dataclass(frozen=True)
class LatencyPrediction:
    """A model's predicted latency at one batch size, in milliseconds, with its parts."""

    batch_size: int
    total_ms: float
    embed_ms: float
    head_ms: float
    blocks_ms: np.ndarray     # per block: E + attention's and MLP's increments
    attn_ms: np.ndarray       # per block: the attention branch's increment over an emptied one (0 when removed)
    mlp_ms: np.ndarray        # per block: the MLP's increment (0 when removed)


def model_fingerprint(spec: ModelSpec, unpruned_blocks: Sequence[BlockWidths]) -> dict[str, Any]:
    """What a profile records of the architecture it measured: everything that sets the latency but the widths
    pruning changes, plus the unpruned widths (the largest each block can have)."""
    return {"architecture": spec.architecture, "kwargs": dict(spec.kwargs), "family": spec.family,
            "blocks": [b.to_dict() for b in unpruned_blocks]}


def check_fits(profile: LatencyProfile, spec: ModelSpec, source: str = "the model") -> None:
    """Refuse a model the table does not describe: another architecture or keyword arguments, a block
    wider than the measured range, or token merging (the table holds one token count)."""
    record = profile.model
    if (spec.architecture, dict(spec.kwargs), spec.family) != (record["architecture"], dict(record["kwargs"]),
                                                               record["family"]):
        raise IncompatibleArtifactError(
            f"{source} is {spec.architecture} {dict(spec.kwargs)}, the profile was measured for "
            f"{record['architecture']} {dict(record['kwargs'])}: profile that architecture")
    if spec.token_merging is not None:
        raise NotImplementedStageError(f"{source} merges tokens; a profile holds one token count per block, so "
                                       "predicting a token-merging model is not supported yet")
    if len(spec.blocks) != len(profile.blocks):
        raise IncompatibleArtifactError(f"{source} has {len(spec.blocks)} blocks, the profile's architecture "
                                        f"{len(profile.blocks)}")
    heads = np.array([b.heads for b in spec.blocks])
    hidden = np.array([b.mlp_hidden for b in spec.blocks])
    head_dims = np.array([b.head_dim for b in spec.blocks])
    wrong = np.flatnonzero(head_dims != np.array([b.head_dim for b in profile.blocks]))
    if wrong.size:
        raise IncompatibleArtifactError(f"{source}: block {wrong[0]} has head_dim {head_dims[wrong[0]]}, the "
                                        f"profiled architecture {profile.blocks[wrong[0]].head_dim}")
    for name, widths, table in (("heads", heads, profile.attn), ("MLP neurons", hidden, profile.mlp)):
        over = np.flatnonzero(widths > table.widths[-1])
        if over.size:
            raise IncompatibleArtifactError(f"{source}: block {over[0]} has {widths[over[0]]} {name}, the profile "
                                            f"measured up to {table.widths[-1]}")


def predict_latency(profile: LatencyProfile, blocks: Sequence[BlockWidths], batch_size: int) -> LatencyPrediction:
    """The latency of a model with these per-block widths (``model.blocks`` of a pruned model) at ``batch_size``.

    Sum rule (module docstring): embed + head + Σ_l [E + A(h_l) − E if h_l > 0 + M(m_l) − E if m_l > 0].
    Between measured MLP widths the latency is interpolated linearly; below the smallest
    measured width it is the smallest's (the default grid starts at 1 neuron). Widths are
    checked against the measured range by :func:`check_fits`; here a width beyond it is a
    programming error.
    """
    if batch_size not in profile.batch_sizes:
        raise UsageError(f"the profile measured batch sizes {list(profile.batch_sizes)}, not {batch_size}")
    column = profile.batch_sizes.index(batch_size)
    heads = np.array([b.heads for b in blocks], dtype=np.float64)
    hidden = np.array([b.mlp_hidden for b in blocks], dtype=np.float64)
    if heads.max(initial=0) > profile.attn.widths[-1] or hidden.max(initial=0) > profile.mlp.widths[-1]:
        raise ValueError("widths beyond the profile's measured range (check_fits refuses such a model)")
    empty = profile.block_ms[column]
    attn = np.where(heads > 0, profile.attn.at(heads, column) - empty, 0.0)
    mlp = np.where(hidden > 0, profile.mlp.at(hidden, column) - empty, 0.0)
    per_block = empty + attn + mlp
    embed, head = profile.embed_ms[column], profile.head_ms[column]
    return LatencyPrediction(batch_size=batch_size, total_ms=float(embed + head + per_block.sum()),
                             embed_ms=embed, head_ms=head, blocks_ms=per_block, attn_ms=attn, mlp_ms=mlp)


def predict_model(profile: LatencyProfile, spec: ModelSpec, batch_size: int,
                  source: str = "the model") -> LatencyPrediction:
    """The latency of the model ``spec`` describes (a pruned artifact's ``model.blocks`` included) on the
    profiled device, after :func:`check_fits` refused what the table does not describe."""
    check_fits(profile, spec, source)
    return predict_latency(profile, spec.blocks, batch_size)


def default_mlp_widths(hidden: int, points: int = 8) -> tuple[int, ...]:
    """One neuron, then ``points`` evenly spaced widths up to ``hidden``: every width pruning can leave lies
    between two measured ones (or is one)."""
    grid = np.maximum(np.rint(np.linspace(0, hidden, points + 1)[1:]).astype(int), 1)
    return tuple(int(w) for w in np.unique(np.concatenate([[1], grid])))
