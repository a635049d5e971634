"""What ViT and Swin blocks share: a pre-norm attention branch and a pre-norm MLP branch.

Both families use timm's fused multi-head attention layout — one ``qkv`` linear whose
output rows are laid out ``[3, heads, head_dim]`` and a ``proj`` whose input columns are
``[heads, head_dim]`` — and timm's ``Mlp`` (``fc1``, activation, ``fc2``). So a head is its
``head_dim`` rows of each of q, k and v plus its ``proj`` columns, a neuron its ``fc1`` row
and ``fc2`` column, whatever the family. This module slices, resizes and views those;
the family modules add what is theirs (where the blocks are, ViT's ``attn_dim``, Swin's
per-head relative position bias column, how gate inputs map to samples and tokens).

A branch that keeps no unit at all is removed with its norm (and layer scale, where the
block has one): the block holds an :class:`EmptyBranch` there and computes ``x + 0``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

from tapvits_cli.errors import NotImplementedStageError
from tapvits_cli.models.units import OwnedWeights


class EmptyBranch(nn.Module):
    """A removed attention or MLP branch: contributes zeros to the residual stream, owns no weight.

    ``head_dim`` keeps the architecture's head width of a removed attention branch, so the
    spec still says what a head of this block was.
    """

    def __init__(self, head_dim: int = 0):
        super().__init__()
        self.head_dim = head_dim

    def forward(self, x, *args, **kwargs):
        return torch.zeros_like(x)


def remove_branch(blk, kind: str, head_dim: int = 0) -> None:
    """Replace a block's attention or MLP branch (its norm and any layer scale too) by an :class:`EmptyBranch`."""
    number, branch = (1, "attn") if kind == "attn" else (2, "mlp")
    setattr(blk, f"norm{number}", nn.Identity())
    setattr(blk, branch, EmptyBranch(head_dim if kind == "attn" else 0))
    if hasattr(blk, f"ls{number}"):
        setattr(blk, f"ls{number}", nn.Identity())


def check_prunable(index: int, attn, mlp) -> None:
    """Narrower q/k/v and fc1 equal the masked model only without a norm or gate across units."""
    if isinstance(attn, EmptyBranch) or isinstance(mlp, EmptyBranch):
        raise NotImplementedStageError(f"block {index} already lost a whole branch; pruning or scoring such a "
                                       "model again is not supported yet")
    if getattr(attn, "gate", None) is not None or not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity) \
            or not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        raise NotImplementedStageError(f"block {index}: gated or inner-normed attention/MLP is not supported yet")


def mlp_hidden(mlp) -> int:
    return 0 if isinstance(mlp, EmptyBranch) else mlp.fc1.out_features


def sliced(linear, rows=None, columns=None):
    """A new ``nn.Linear`` holding the selected output rows (with their bias) or input columns."""
    weight, bias = linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
    if rows is not None:
        weight, bias = weight.index_select(0, rows), None if bias is None else bias.index_select(0, rows)
    if columns is not None:
        weight = weight.index_select(1, columns)
    result = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    result.weight = nn.Parameter(weight.clone(), requires_grad=linear.weight.requires_grad)
    if bias is not None:
        result.bias = nn.Parameter(bias.clone(), requires_grad=linear.bias.requires_grad)
    return result


def keep_heads(attn, heads: torch.Tensor, head_dim: int) -> None:
    """Keep only ``heads`` (sorted indices) of a fused attention: q/k/v rows of ``qkv``, columns of ``proj``."""
    attn_dim = attn.qkv.out_features // 3
    channels = (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).reshape(-1)
    rows = (torch.arange(3, device=heads.device)[:, None] * attn_dim + channels).reshape(-1)
    attn.qkv = sliced(attn.qkv, rows=rows)
    attn.proj = sliced(attn.proj, columns=channels)
    attn.num_heads = len(heads)


def resize_heads(attn, heads: int, head_dim: int) -> None:
    """Give a fused attention ``heads`` heads (fresh, uninitialised ``qkv`` and ``proj``)."""
    dim, attn_dim = attn.qkv.in_features, heads * head_dim
    attn.qkv = nn.Linear(dim, 3 * attn_dim, bias=attn.qkv.bias is not None)
    attn.proj = nn.Linear(attn_dim, attn.proj.out_features, bias=attn.proj.bias is not None)
    attn.num_heads = heads


def keep_neurons(mlp, neurons: torch.Tensor) -> None:
    mlp.fc1, mlp.fc2 = sliced(mlp.fc1, rows=neurons), sliced(mlp.fc2, columns=neurons)


def resize_mlp(mlp, hidden: int) -> None:
    mlp.fc1 = nn.Linear(mlp.fc1.in_features, hidden, bias=mlp.fc1.bias is not None)
    mlp.fc2 = nn.Linear(hidden, mlp.fc2.out_features, bias=mlp.fc2.bias is not None)


def head_weights(attn, head_dim: int) -> list[OwnedWeights]:
    """What each head owns in ``qkv`` (rows, bias) and ``proj`` (columns), viewed as (heads, m)."""
    heads = attn.num_heads

    def qkv_rows(t):   # (3*A, ...) -> (heads, 3*head_dim*...)
        return t.reshape(3, heads, head_dim, -1).transpose(0, 1).reshape(heads, -1)

    def proj_columns(t):   # (dim, A) -> (heads, dim*head_dim)
        return t.reshape(t.shape[0], heads, head_dim).transpose(0, 1).reshape(heads, -1)

    owned = [OwnedWeights(attn.qkv.weight, qkv_rows), OwnedWeights(attn.proj.weight, proj_columns)]
    if attn.qkv.bias is not None:
        owned.append(OwnedWeights(attn.qkv.bias, qkv_rows))
    return owned


def neuron_weights(mlp) -> list[OwnedWeights]:
    """What each hidden neuron owns: its ``fc1`` row and bias, its ``fc2`` column, viewed as (neurons, m)."""
    hidden = mlp.fc1.out_features
    owned = [OwnedWeights(mlp.fc1.weight, lambda t: t.reshape(hidden, -1)), OwnedWeights(mlp.fc2.weight, lambda t: t.t())]
    if mlp.fc1.bias is not None:
        owned.append(OwnedWeights(mlp.fc1.bias, lambda t: t.reshape(hidden, 1)))
    return owned


def slice_blocks(blocks: Sequence, attn_keep: Sequence, mlp_keep: Sequence, head_dim: Callable[[nn.Module], int],
                 heads_kept: Callable[[nn.Module, torch.Tensor], None]) -> None:
    """Keep, in place, only the listed heads and MLP neurons of each block (sorted indices): the
    loop every family shares. ``head_dim(attn)`` is the family's head width, ``heads_kept(attn,
    heads)`` slices what else its heads own once q, k, v and ``proj`` are sliced. An empty
    list removes the branch (see :class:`EmptyBranch`)."""
    for index, (blk, heads, neurons) in enumerate(zip(blocks, attn_keep, mlp_keep)):
        attn, mlp = blk.attn, blk.mlp
        check_prunable(index, attn, mlp)
        heads = torch.as_tensor(heads, dtype=torch.long, device=attn.qkv.weight.device)
        neurons = torch.as_tensor(neurons, dtype=torch.long, device=mlp.fc1.weight.device)
        if len(heads) == 0:
            remove_branch(blk, "attn", head_dim(attn))
        elif len(heads) < attn.num_heads:
            keep_heads(attn, heads, head_dim(attn))
            heads_kept(attn, heads)
        if len(neurons) == 0:
            remove_branch(blk, "mlp")
        elif len(neurons) < mlp.fc1.out_features:
            keep_neurons(mlp, neurons)


def resize_blocks(blocks: Sequence, widths: Sequence, head_dim: Callable[[nn.Module], int],
                  heads_resized: Callable[[nn.Module, int], None]) -> None:
    """Resize each block's attention and MLP to ``widths`` (fresh, uninitialised weights): the loop
    every family shares when loading a pruned artifact. ``heads_resized(attn, heads)`` resizes
    what else the family's heads own. Width 0 removes the branch."""
    if len(widths) != len(blocks):
        raise ValueError(f"{len(widths)} block widths for a model with {len(blocks)} blocks")
    for index, (blk, width) in enumerate(zip(blocks, widths)):
        attn, mlp = blk.attn, blk.mlp
        if width.head_dim != head_dim(attn):
            raise ValueError(f"block {index}: head_dim {width.head_dim} differs from the architecture's "
                             f"{head_dim(attn)}")
        if width.heads != attn.num_heads or width.mlp_hidden != mlp.fc1.out_features:
            check_prunable(index, attn, mlp)
        if width.heads == 0:
            remove_branch(blk, "attn", head_dim(attn))
        elif width.heads != attn.num_heads:
            resize_heads(attn, width.heads, width.head_dim)
            heads_resized(attn, width.heads)
        if width.mlp_hidden == 0:
            remove_branch(blk, "mlp")
        elif width.mlp_hidden != mlp.fc1.out_features:
            resize_mlp(mlp, width.mlp_hidden)
