"""Physical pruning: a plan's kept units applied to a model, by the model's family.

Criteria-free and file-free: the plan arrives as kept unit indices per block, the family
module (``models/families``) slices its own layers (``prune_blocks`` of ``vit``, ``swin``),
so a new family needs nothing here.
"""

from __future__ import annotations

import copy
from typing import Mapping, Sequence

import numpy as np

from tapvits_cli.errors import IncompatibleArtifactError
from tapvits_cli.vocabulary import UNIT_KINDS


def prune_model(model, keep: Mapping[str, Sequence[np.ndarray]]):
    """A pruned copy of ``model`` keeping, per block, ``keep["attn"][l]`` heads and ``keep["mlp"][l]`` neurons.

    Indices are sorted unit indices of the unpruned model; an empty list removes that
    branch. The pruned model computes exactly what ``model`` computes with every other
    unit's output zeroed (``models.units.removing``).
    """
    from tapvits_cli.models.families import family_module, family_of

    family = family_module(family_of(model))
    widths = family.block_widths(model)
    if not len(keep["attn"]) == len(keep["mlp"]) == len(widths):
        raise IncompatibleArtifactError(f"the plan covers {len(keep['attn'])} blocks, the model has {len(widths)}")
    for index, width in enumerate(widths):
        for kind in UNIT_KINDS:
            kept = np.asarray(keep[kind][index])
            if len(kept) and (kept.min() < 0 or kept.max() >= width.units(kind)):
                raise IncompatibleArtifactError(f"block {index}: the plan keeps {kind} unit {kept.max()} of "
                                                f"{width.units(kind)}")
    pruned = copy.deepcopy(model)
    family.prune_blocks(pruned, keep["attn"], keep["mlp"])
    return pruned
