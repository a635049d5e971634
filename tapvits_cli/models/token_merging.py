"""Token merging for timm ViTs: ToMe's bipartite soft matching and CAIT-style neighbour merging.

This module is the timm patch (the blocks that merge, installing and reading them back);
the matching itself is in :mod:`tapvits_cli.models.token_matching`.

Why: every token a block merges away makes all later attention (quadratically) and MLP
work cheaper, on top of what pruning heads and neurons saves, with no weight changed.

A :class:`~tapvits_cli.models.spec.TokenMerging` is plain data (method, amount per block,
proportional attention; it lives with the rest of the spec, so reading an artifact needs
no torch) that a model artifact stores under ``model.token_merging`` (protocol/model.md);
:func:`set_token_merging` installs it on a built model, so everything that loads the
artifact (eval, finetune, export, feature extraction) runs the merged model.

Where and what (the same for both methods):

- In each block, tokens merge between the attention and the MLP (as in ToMe): the
  attention sees the block's incoming tokens, the MLP and all later blocks the merged ones.
- Prefix tokens (class token, distillation and register tokens) are never merged and stay
  first, in their order.
- A merged token is the size-weighted mean of the tokens it absorbs and carries its size,
  the number of patches it stands for. With proportional attention every later attention
  adds log(size) to each key's logit, so a token standing for s patches weighs as much as
  s identical tokens would (merging identical tokens changes nothing).
- Similarity is the cosine similarity of the tokens' attention keys, averaged over heads
  (ToMe: keys summarise what a token contains). A block whose attention branch was pruned
  away has no keys; it compares the tokens entering it (the residual stream) instead.

Methods (``schedule[l]`` is block l's amount):

- ``bipartite`` (ToMe): remove ``schedule[l]`` tokens. The patch tokens, in their current
  order, alternate into sets A (even positions) and B (odd); each A token proposes its
  most similar B token and the ``schedule[l]`` most similar proposals merge (several A
  tokens may join one B token). At most half of the patch tokens go per block. Output
  order: prefix, the unmerged A tokens in their order, then the B tokens.
- ``neighbour`` (CAIT-style, keeps a grid for dense tasks): merge ``schedule[l]`` pairs of
  adjacent grid lines. The lines are columns when the current grid is at least as wide as
  tall, else rows (a square grid alternates). Candidate pairs are the disjoint adjacent
  pairs (0, 1), (2, 3), … of lines; per image, the pairs whose tokens are most similar
  (mean over the line) merge: token (i, 2j) with token (i, 2j+1) for every row i (for
  columns). A token only ever absorbs its direct neighbour in the current grid, the result
  is an H×(W−k) (or (H−k)×W) grid in row-major order, and each token covers a rectangle
  of patches. At most half of the lines go per block.

Everything is vectorised over the batch and the tokens: a merge is one ``scatter_add`` of
every token into its output slot, and the slots come from matrix products, ``topk`` and
``cumsum``. Token counts per block depend on the input size only, so they are fixed when
the merging is installed (:meth:`TokenMerging.steps`), which also keeps ONNX graphs static.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tapvits_cli.errors import NotImplementedStageError, UsageError
from tapvits_cli.models.families import family_of
from tapvits_cli.models.families.branches import EmptyBranch
from tapvits_cli.models.spec import MergeStep, TokenMerging
from tapvits_cli.models.token_matching import bipartite_destinations, merge_tokens, neighbour_destinations


def attention_with_keys(attn, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """timm ``Attention.forward`` (fused path) plus log(size) on every key's logit; also the keys averaged over heads."""
    batch, tokens, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = None if size is None else size.log()[:, None, None, :].to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                         dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = attn.norm(out.transpose(1, 2).reshape(batch, tokens, attn.attn_dim))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), k.mean(dim=1)


class MergingBlocks(nn.Sequential):
    """A ViT's ``blocks`` run with token merging: the same block modules under the same
    names (``blocks.0…``), so state dicts and weight hashes do not change."""

    def __init__(self, blocks: Sequence[nn.Module], merging: TokenMerging, steps: Sequence[MergeStep], prefix: int):
        super().__init__(*blocks)
        self.merging, self.steps, self.prefix = merging, tuple(steps), prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = None
        for block, step in zip(self, self.steps):
            x, size = self._block(block, x, size, step)
        return x

    def _block(self, block, x, size, step: MergeStep):
        if isinstance(block.attn, EmptyBranch):
            metric = x   # no heads, no keys: compare the tokens entering the block
        else:
            out, metric = attention_with_keys(block.attn, block.norm1(x),
                                              size if self.merging.proportional_attention else None)
            x = x + block.drop_path1(block.ls1(out))
        if step.amount:
            metric = metric.detach()
            slots = (bipartite_destinations(metric, step.amount, self.prefix) if self.merging.method == "bipartite"
                     else neighbour_destinations(metric, step.amount, self.prefix, step.grid, step.axis))
            x, size = merge_tokens(x, size, slots, step.tokens_out)
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x)))), size


def token_merging_of(model) -> TokenMerging | None:
    """The merging installed on ``model`` (None when it runs every token through every block)."""
    blocks = getattr(model, "blocks", None)
    return blocks.merging if isinstance(blocks, MergingBlocks) else None


def token_grid(model) -> tuple[tuple[int, int], int]:
    """``((rows, columns) of patches, prefix tokens)`` a ViT's blocks receive."""
    return tuple(model.patch_embed.grid_size), int(model.num_prefix_tokens)


def set_token_merging(model, merging: TokenMerging | None) -> None:
    """Install ``merging`` on ``model`` in place (None removes it); works on pruned blocks.

    Only the ``vit`` family (timm VisionTransformer) supports it; the amounts must fit the
    model's patch grid (:meth:`TokenMerging.steps`).
    """
    if merging is None:
        if isinstance(getattr(model, "blocks", None), MergingBlocks):
            model.blocks = nn.Sequential(*model.blocks)
        return
    check_supported(model)
    blocks = list(model.blocks)
    if len(merging.schedule) != len(blocks):
        raise UsageError(f"the token-merging schedule has {len(merging.schedule)} entries for a model with "
                         f"{len(blocks)} blocks")
    grid, prefix = token_grid(model)
    model.blocks = MergingBlocks(blocks, merging, merging.steps(grid, prefix), prefix)


def check_supported(model) -> None:
    """:class:`NotImplementedStageError` (exit 7, an unsupported model) unless ``model`` is a ViT with a
    fixed patch grid (Swin and generic models are not)."""
    family = family_of(model)
    if family != "vit":
        raise NotImplementedStageError(f"token merging is supported for the vit family (timm VisionTransformer: ViT, DeiT) only, "
                         f"not for this {family} model")
    if getattr(model, "dynamic_img_size", False) or not isinstance(model.patch_drop, nn.Identity):
        raise NotImplementedStageError("token merging needs a fixed patch grid: models with dynamic_img_size or patch dropout "
                         "are not supported")
