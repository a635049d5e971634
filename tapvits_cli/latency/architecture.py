"""A ViT's layout read from a model file's header, without torch or timm.

``tapvits profile`` on the device install (onnxruntime) builds the blocks it times from
this description (``latency/onnx_graphs.py``), so it must know everything that shapes the
computation: the embedding width, the patch size, the prefix tokens, the unpruned widths
(the largest each block can have), and the optional parts timm's ViT may hold (qkv bias,
layer scale, ``fc_norm``, the pooling). All of it is read off the safetensors header (the
tensor names and shapes) and the model metadata; the weights are never read.

The unpruned widths follow timm's ViT rules: ``head_dim = embed_dim // num_heads``, so the
unpruned head count is ``embed_dim // head_dim``, and the MLP's hidden width is
``int(embed_dim * mlp_ratio)`` (``mlp_ratio`` from the model's keyword arguments, else
timm's default 4.0). A layout timm's plain ViT blocks do not describe (a tensor this
module does not know, e.g. ``q_norm`` or ``attn_pool``) is refused rather than guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from tapvits_cli.errors import InvalidArtifactError, NotImplementedStageError
from tapvits_cli.models.spec import BlockWidths, ModelSpec

DEFAULT_MLP_RATIO = 4.0    # timm VisionTransformer's default
LAYER_NORM_EPS = 1e-6      # timm ViT's norm layer

# Tensors of timm's plain ViT with its optional parts; anything else is a layout the graphs do not build.
_KNOWN = re.compile(r"(patch_embed\.proj\.(weight|bias)|cls_token|reg_token|pos_embed|(norm|fc_norm|head)\.(weight|bias)"
                    r"|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
                    r"|blocks\.\d+\.ls[12]\.gamma)")


@dataclass(frozen=True)
class Architecture:
    """What a profile needs to know of the unpruned architecture.

    ``blocks``, ``tokens`` (patches + prefix tokens), ``dim`` and ``input_size`` are what the
    torch path reads off a ``meta`` build too; the rest is what building the graphs needs.
    """

    blocks: tuple[BlockWidths, ...]
    tokens: int
    dim: int
    input_size: tuple[int, int, int]
    patch_size: int = 16
    prefix_tokens: int = 1           # class token, then register tokens
    class_token: bool = True
    pos_embed_prefix: bool = True    # False: timm's no_embed_class, the position embedding covers patches only
    qkv_bias: bool = True
    layer_scale: bool = False
    global_pool: str = "token"       # "token" (the class token) or "avg" (mean of the patch tokens)
    final_norm: bool = True          # False when timm moves the final norm after the pooling (fc_norm)
    fc_norm: bool = False
    num_classes: int = 0
    eps: float = LAYER_NORM_EPS


def read_architecture(spec: ModelSpec, tensors: Mapping[str, Sequence[int]], source: str = "the model") -> Architecture:
    """The unpruned layout of ``spec``'s ViT from its tensor names and shapes (module docstring).

    Raises :class:`NotImplementedStageError` for a family or a layout the graphs do not
    build, :class:`InvalidArtifactError` when the shapes contradict the metadata.
    """
    if spec.family != "vit":
        raise NotImplementedStageError(f"tapvits profile measures ViT/DeiT models (family 'vit'); {spec.architecture} "
                                       f"is family '{spec.family}', which is not supported yet")
    unknown = sorted(name for name in tensors if not _KNOWN.fullmatch(name))
    if unknown:
        raise NotImplementedStageError(f"{source}: tensor '{unknown[0]}' is not part of the plain ViT block layout "
                                       "the device's graphs build: profile it with --runtime torch")
    ranks = {"patch_embed.proj.weight": 4, "pos_embed": 3, "reg_token": 3, "head.weight": 2}
    for name, rank in ranks.items():
        if (name in tensors or name in ("patch_embed.proj.weight", "pos_embed")) and len(tensors.get(name, ())) != rank:
            raise InvalidArtifactError(f"{source}: a ViT needs a {rank}-dimensional '{name}'")
    dim, channels, patch, patch_w = (int(v) for v in tensors["patch_embed.proj.weight"])
    if min(dim, channels, patch) < 1:
        raise InvalidArtifactError(f"{source}: 'patch_embed.proj.weight' has an empty dimension")
    if patch != patch_w:
        raise NotImplementedStageError(f"{source}: non-square patches ({patch}x{patch_w}) are not supported")
    input_size = spec.preprocessing.get("input_size")
    if not isinstance(input_size, list) or len(input_size) != 3 or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in input_size) \
            or input_size[0] != channels or input_size[1] % patch or input_size[2] % patch:
        raise InvalidArtifactError(f"{source}: input size {input_size} does not fit {channels}-channel "
                                   f"{patch}x{patch} patches")
    input_size = tuple(input_size)
    patches = (input_size[1] // patch) * (input_size[2] // patch)
    class_token = "cls_token" in tensors
    prefix = int(class_token) + (int(tensors["reg_token"][1]) if "reg_token" in tensors else 0)
    positions = int(tensors["pos_embed"][1])
    if positions not in (patches, patches + prefix):
        raise InvalidArtifactError(f"{source}: 'pos_embed' covers {positions} tokens, the input {patches} patches "
                                   f"and {prefix} prefix tokens")
    head_dims = {b.head_dim for b in spec.blocks}
    if min(head_dims, default=1) < 1:
        raise InvalidArtifactError(f"{source}: model.blocks has a head_dim of 0")
    if len(head_dims) != 1 or dim % next(iter(head_dims)):
        raise NotImplementedStageError(f"{source}: blocks of different head sizes, or heads that do not divide the "
                                       f"embedding width {dim}, are not supported by tapvits profile")
    head_dim = head_dims.pop()
    ratio = spec.kwargs.get("mlp_ratio", DEFAULT_MLP_RATIO)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0:
        raise InvalidArtifactError(f"{source}: mlp_ratio must be a positive number, got {ratio!r}")
    unpruned = BlockWidths(dim // head_dim, head_dim, int(dim * float(ratio)))
    wider = [i for i, b in enumerate(spec.blocks) if b.heads > unpruned.heads or b.mlp_hidden > unpruned.mlp_hidden]
    if wider:
        raise NotImplementedStageError(
            f"{source}: block {wider[0]} is wider than {unpruned.heads} heads and {unpruned.mlp_hidden} MLP neurons, "
            f"what {spec.architecture} has with mlp_ratio {ratio}: profile it with --runtime torch")
    global_pool = spec.kwargs.get("global_pool", "token" if class_token else "avg")
    if global_pool not in ("token", "avg"):
        raise NotImplementedStageError(f"{source}: global_pool '{global_pool}' is not supported by the device's graphs")
    qkv_bias = any(name.endswith("attn.qkv.bias") for name in tensors) or (
        not any(name.endswith("attn.qkv.weight") for name in tensors) and bool(spec.kwargs.get("qkv_bias", True)))
    architecture = Architecture(
        blocks=(unpruned,) * len(spec.blocks), tokens=patches + prefix, dim=dim, input_size=input_size,
        patch_size=patch, prefix_tokens=prefix, class_token=class_token,
        pos_embed_prefix=prefix == 0 or positions != patches,
        qkv_bias=qkv_bias, layer_scale=any(".ls1." in name or ".ls2." in name for name in tensors),
        global_pool=global_pool, final_norm="norm.weight" in tensors, fc_norm="fc_norm.weight" in tensors,
        num_classes=int(tensors["head.weight"][0]) if "head.weight" in tensors else 0)
    for name, shape in tensors.items():
        expected = _expected_shape(name, architecture, spec.blocks)
        if tuple(int(v) for v in shape) != expected:
            raise InvalidArtifactError(f"{source}: tensor '{name}' has shape {list(shape)}, the metadata and the "
                                       f"other tensors make it {list(expected) if expected else 'not exist'}")
    return architecture


def _expected_shape(name: str, arch: Architecture, blocks: Sequence[BlockWidths]) -> tuple[int, ...] | None:
    """The shape timm's ViT gives tensor ``name`` at these per-block widths; None for a block that does not exist."""
    d = arch.dim
    fixed = {"patch_embed.proj.weight": (d, arch.input_size[0], arch.patch_size, arch.patch_size),
             "cls_token": (1, 1, d), "reg_token": (1, arch.prefix_tokens - arch.class_token, d),
             "pos_embed": (1, arch.tokens if arch.pos_embed_prefix else arch.tokens - arch.prefix_tokens, d),
             "head.weight": (arch.num_classes, d), "head.bias": (arch.num_classes,)}
    if name in fixed:
        return fixed[name]
    if not name.startswith("blocks."):
        return (d,)   # the patch embedding's bias, the norms' weights and biases
    index, rest = name.split(".", 2)[1:]
    if int(index) >= len(blocks):
        return None
    width = blocks[int(index)]
    attn, hidden = width.heads * width.head_dim, width.mlp_hidden
    return {"attn.qkv.weight": (3 * attn, d), "attn.qkv.bias": (3 * attn,), "attn.proj.weight": (d, attn),
            "mlp.fc1.weight": (hidden, d), "mlp.fc1.bias": (hidden,), "mlp.fc2.weight": (d, hidden)}.get(rest, (d,))
