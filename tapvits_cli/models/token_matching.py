"""Which tokens merge, and into what: the matching of token merging, on plain tensors.

Pure functions of token features (no module, no timm): each ``*_destinations`` gives every
token the output slot it merges into, and :func:`merge_tokens` averages the tokens that
share a slot. :mod:`tapvits_cli.models.token_merging` runs them inside a timm ViT's
blocks; the methods themselves are described there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bipartite_destinations(metric: torch.Tensor, amount: int, prefix: int) -> torch.Tensor:
    """(B, N) output slot of every token for ToMe's bipartite matching that removes ``amount`` tokens."""
    patches = F.normalize(metric[:, prefix:], dim=-1)
    side_a, side_b = patches[:, 0::2], patches[:, 1::2]
    count_a, count_b = side_a.shape[1], side_b.shape[1]
    similarity, partner = (side_a @ side_b.transpose(1, 2)).max(dim=-1)            # (B, A)
    chosen = similarity.topk(amount, dim=-1).indices                                  # (B, amount)
    merged = (torch.arange(count_a, device=metric.device) == chosen[:, :, None]).any(dim=1)   # (B, A)
    first_b = prefix + count_a - amount                                               # B tokens follow the kept A ones
    slot_a = torch.where(merged, first_b + partner, prefix - 1 + (~merged).long().cumsum(dim=-1))
    slot_b = first_b + torch.arange(count_b, device=metric.device).expand_as(slot_a[:, :count_b])
    interleaved = torch.stack([slot_a[:, :count_b], slot_b], dim=-1).flatten(1)      # back to A, B, A, B… order
    prefix_slots = torch.arange(prefix, device=metric.device).expand_as(metric[:, :prefix, 0])
    return torch.cat([prefix_slots, interleaved, slot_a[:, count_b:]], dim=1)


def neighbour_destinations(metric: torch.Tensor, amount: int, prefix: int, grid: tuple[int, int],
                           axis: str) -> torch.Tensor:
    """(B, N) output slot of every token when ``amount`` pairs of adjacent columns (or rows) merge."""
    height, width = grid
    patches = F.normalize(metric[:, prefix:], dim=-1).unflatten(1, (height, width))   # (B, H, W, C)
    lines = patches if axis == "columns" else patches.transpose(1, 2)                  # lines along dim 2
    count = lines.shape[2]
    pairs = count // 2
    similarity = (lines[:, :, 0:2 * pairs:2] * lines[:, :, 1:2 * pairs:2]).sum(-1).mean(1)   # (B, pairs)
    absorbed_lines = 2 * similarity.topk(amount, dim=-1).indices + 1                     # right/lower line of a pair
    absorbed = (torch.arange(count, device=metric.device) == absorbed_lines[:, :, None]).any(dim=1)   # (B, lines)
    new_line = torch.arange(count, device=metric.device) - absorbed.long().cumsum(dim=-1)   # (B, lines)
    rows = torch.arange(height, device=metric.device)[:, None]
    columns = torch.arange(width, device=metric.device)[None, :]
    if axis == "columns":
        slots = rows * (width - amount) + new_line[:, None, :]
    else:
        slots = new_line[:, :, None] * width + columns
    prefix_slots = torch.arange(prefix, device=metric.device).expand_as(metric[:, :prefix, 0])
    return torch.cat([prefix_slots, prefix + slots.flatten(1)], dim=1)


def merge_tokens(x: torch.Tensor, size: torch.Tensor | None, slots: torch.Tensor,
                 count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted means of the tokens sharing an output slot: ``(B, count, C)`` tokens and their sizes.

    ``size`` (B, N) is how many patches each token stands for (None: all 1).
    """
    weights = torch.ones_like(x[:, :, :1]) if size is None else size[:, :, None]
    index = slots[:, :, None]
    totals = torch.zeros_like(x[:, :count]).scatter_add(1, index.expand_as(x), x * weights)
    sizes = torch.zeros_like(weights[:, :count]).scatter_add(1, index, weights)
    return totals / sizes, sizes[:, :, 0]
