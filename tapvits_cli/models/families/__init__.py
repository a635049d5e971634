"""Model families: which timm models tapvits can prune, and how their blocks are shaped.

Each family module provides:

- ``is_member(model)``, ``block_widths(model)``, ``set_block_widths(model, widths)``;
- ``unit_layers(model)`` → list of :class:`~tapvits_cli.models.units.UnitLayer`, per block
  its attention heads and its MLP neurons: unit counts, the gate module whose input holds
  the units' outputs (what scoring observes and masks), the weights each unit owns;
- ``block_sequence(model)`` → :class:`~tapvits_cli.models.units.BlockSequence` (stem,
  blocks, tail), so a KL probe of block l replays blocks l..L from a cached input;
- ``cost_model(model)`` → :class:`~tapvits_cli.models.units.CostModel`, parameters and
  MACs per unit (works on a ``meta``-device model).

The importance criteria and the budget allocation use only these views, so a new family
(Swin) never touches them. A model outside every family can still be loaded and used as
a feature extractor: its family is ``generic`` and it has no prunable blocks.
"""

from __future__ import annotations

from types import ModuleType

from tapvits_cli.errors import UsageError
from tapvits_cli.models.families import vit

FAMILIES: dict[str, ModuleType] = {"vit": vit}
GENERIC = "generic"
SUPPORTED_DESCRIPTION = "vit (timm VisionTransformer: ViT, DeiT and other vit_*/deit_* models)"


def family_of(model) -> str:
    """The family name of ``model``, or ``generic`` when no family can prune it."""
    for name, module in FAMILIES.items():
        if module.is_member(model):
            return name
    return GENERIC


def family_module(name: str) -> ModuleType:
    """The module of a prunable family; a clear error for anything else."""
    if name not in FAMILIES:
        raise UsageError(
            f"model family '{name}' cannot be pruned; supported families: {SUPPORTED_DESCRIPTION}"
        )
    return FAMILIES[name]
