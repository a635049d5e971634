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

M(m) depends on m's alignment, not only on its size: CPU matrix-product kernels work on
blocks of several columns (8 floats where they were measured), and a width that is not a
multiple of the block pays for a remainder. For DeiT-Small at batch 32 (one thread) the
MLP's products cost 1.3-1.45x as much per neuron at such widths as at multiples of 8, a
whole MLP-only block one neuron below a multiple 1.2-1.3x as much as at the multiple.
The default grid's widths are multiples and random pruning leaves mostly other widths,
so one curve through the grid under-predicts them. A profile with an MLP alignment N > 1
thus holds two curves: M on multiples of N (``mlp``) and M one neuron below them
(``mlp_unaligned``); a width that is a multiple of N reads the first, any other width the
second. The sum rule is unchanged, only which curve gives M(m).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from tapvits_cli.errors import IncompatibleArtifactError, NotImplementedStageError, ParameterError, UsageError
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
    mlp_alignment: int = 1
    mlp_unaligned: BranchTable | None = None

    def __post_init__(self):
        if (self.mlp_alignment > 1) != (self.mlp_unaligned is not None):
            raise ValueError("an MLP alignment > 1 comes with the unaligned table, alignment 1 without one")

    @property
    def blocks(self) -> tuple[BlockWidths, ...]:
        return tuple(BlockWidths(b["heads"], b["head_dim"], b["mlp_hidden"]) for b in self.model["blocks"])

    def mlp_aligned(self, hidden: np.ndarray) -> np.ndarray:
        """Per width, whether it reads the aligned curve ``mlp`` (a multiple of the alignment; every width at 1)."""
        return np.asarray(hidden) % self.mlp_alignment == 0

    def mlp_at(self, hidden: np.ndarray, column: int) -> np.ndarray:
        """M(m) at each of ``hidden`` (within the measured ranges), each from the curve of its alignment."""
        if self.mlp_unaligned is None:
            return self.mlp.at(hidden, column)
        return np.where(self.mlp_aligned(hidden), self.mlp.at(hidden, column), self.mlp_unaligned.at(hidden, column))

    def mlp_limit(self, hidden: np.ndarray) -> np.ndarray:
        """Per width, the widest width measured on the curve it reads: wider is beyond the table."""
        if self.mlp_unaligned is None:
            return np.full(np.shape(hidden), self.mlp.widths[-1])
        return np.where(self.mlp_aligned(hidden), self.mlp.widths[-1], self.mlp_unaligned.widths[-1])


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
    limits = {"heads": np.full(heads.shape, profile.attn.widths[-1]), "MLP neurons": profile.mlp_limit(hidden)}
    for (name, limit), widths in zip(limits.items(), (heads, hidden)):
        over = np.flatnonzero(widths > limit)
        if over.size:
            raise IncompatibleArtifactError(f"{source}: block {over[0]} has {widths[over[0]]} {name}, the profile "
                                            f"measured up to {limit[over[0]]}{_curve(profile, name, widths[over[0]])}")


def _curve(profile: LatencyProfile, name: str, width: int) -> str:
    """Which MLP curve a width beyond the table would read, for the refusal ("" where there is one curve)."""
    if name == "heads" or profile.mlp_alignment == 1:
        return ""
    return f" for widths {'' if profile.mlp_aligned(width) else 'not '}multiples of {profile.mlp_alignment}"


def predict_latency(profile: LatencyProfile, blocks: Sequence[BlockWidths], batch_size: int) -> LatencyPrediction:
    """The latency of a model with these per-block widths (``model.blocks`` of a pruned model) at ``batch_size``.

    Sum rule (module docstring): embed + head + Σ_l [E + A(h_l) − E if h_l > 0 + M(m_l) − E if m_l > 0].
    M(m) comes from the aligned curve when m is a multiple of the profile's MLP alignment,
    else from the unaligned one (module docstring); on either curve, between measured
    widths the latency is interpolated linearly and below the smallest measured width it
    is the smallest's (the default grids start at the alignment and at 1 neuron). Widths
    are checked against the measured ranges by :func:`check_fits`; here a width beyond
    them is a programming error.
    """
    if batch_size not in profile.batch_sizes:
        raise UsageError(f"the profile measured batch sizes {list(profile.batch_sizes)}, not {batch_size}")
    column = profile.batch_sizes.index(batch_size)
    heads = np.array([b.heads for b in blocks], dtype=np.float64)
    hidden = np.array([b.mlp_hidden for b in blocks], dtype=np.float64)
    if heads.max(initial=0) > profile.attn.widths[-1] or np.any(hidden > profile.mlp_limit(hidden)):
        raise ValueError("widths beyond the profile's measured range (check_fits refuses such a model)")
    empty = profile.block_ms[column]
    attn = np.where(heads > 0, profile.attn.at(heads, column) - empty, 0.0)
    mlp = np.where(hidden > 0, profile.mlp_at(hidden, column) - empty, 0.0)
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


def default_mlp_widths(hidden: int, points: int = 8, alignment: int = 1) -> tuple[int, ...]:
    """The alignment (one neuron at 1), then ``points`` evenly spaced widths up to ``hidden``, each rounded to a
    multiple of ``alignment`` no wider than ``hidden``: every multiple pruning can leave lies between two
    measured widths (or is one)."""
    top = hidden // alignment * alignment
    grid = np.clip(np.rint(np.linspace(0, hidden, points + 1)[1:] / alignment).astype(int) * alignment, alignment, top)
    return tuple(int(w) for w in np.unique(np.concatenate([[alignment], grid])))


def unaligned_mlp_widths(aligned: Sequence[int], alignment: int, hidden: int) -> tuple[int, ...]:
    """The unaligned curve's grid for the aligned grid ``aligned`` (multiples of ``alignment`` > 1): one
    neuron, one below each aligned width, and ``hidden`` itself when it is not a multiple and ``aligned``
    reaches the last multiple below it. Each width between 1 and the aligned grid's end that is not a
    multiple then lies between two measured ones (so does every width up to ``hidden`` for the default
    grid), and each is measured at the speed of a width that is not a multiple (one below one is)."""
    tail = [hidden] if 0 < hidden - aligned[-1] < alignment else []
    return tuple(int(w) for w in np.unique(np.concatenate([[1], np.asarray(aligned) - 1, tail]).astype(int)))


def mlp_grids(hidden: int, alignment: int = 1,
              widths: Sequence[int] | None = None) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """The MLP widths a profile measures for an architecture of ``hidden`` neurons: the aligned grid
    (``widths``, default :func:`default_mlp_widths`) and the unaligned one (None at alignment 1).

    ``widths`` must lie in 1..``hidden`` and, at an alignment > 1, be multiples of it (the
    aligned curve is read only at multiples; measuring it elsewhere would give it an
    unaligned width's speed).
    """
    if alignment < 1:
        raise ParameterError(f"{{mlp_alignment}} must be at least 1, got {alignment}")
    if alignment > hidden:
        raise ParameterError(f"{{mlp_alignment}} {alignment} exceeds the architecture's {hidden} MLP hidden neurons: "
                             "no width is a multiple of it; use 1")
    grid = default_mlp_widths(hidden, alignment=alignment) if widths is None else tuple(sorted(set(widths)))
    if not grid or grid[0] < 1 or grid[-1] > hidden:
        raise UsageError(f"MLP widths must lie in 1..{hidden} (the architecture's), got {list(grid)}")
    stray = [w for w in grid if w % alignment]
    if stray:
        raise ParameterError(f"MLP widths must be multiples of {{mlp_alignment}} {alignment}, not "
                             f"{', '.join(map(str, stray))}: measure multiples of it, or set {{mlp_alignment}} 1 to "
                             "measure any width")
    return grid, (unaligned_mlp_widths(grid, alignment, hidden) if alignment > 1 else None)
