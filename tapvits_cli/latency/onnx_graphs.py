"""ViT parts as ONNX graphs, built with NumPy alone, for ``tapvits profile --runtime onnxruntime``.

The device install has onnxruntime but neither torch (to export modules) nor the ``onnx``
package (to build graphs), so this module writes the few ONNX messages a graph needs
itself: protobuf's wire format is small (varints, length-delimited fields, little-endian
floats), and onnxruntime takes the serialized model as bytes. The profile therefore
runs the same graphs on the device install and on the development install.

The graphs follow timm's ViT forward pass operator by operator, in the shapes and order
torch's ONNX exporter (opset 17) writes: ``Linear`` as ``MatMul`` + ``Add`` on a
transposed weight, ``LayerNormalization``, GELU as its ``Erf`` form (onnxruntime fuses
both), attention with its shapes read at run time, split, two ``MatMul`` and a ``Softmax``
(:func:`_attention`). The test suite checks them against the torch modules with the same
weights. Weights come from a ``weights(name, shape)`` callable that receives timm's
state-dict names: random arrays when profiling (latency does not depend on the values),
a model's own in the tests.
"""

from __future__ import annotations

import math
import struct
from typing import Callable, Sequence

import numpy as np

from tapvits_cli.latency.architecture import Architecture
from tapvits_cli.models.spec import BlockWidths

OPSET = 17
IR_VERSION = 8
_FLOAT, _INT64 = 1, 7                 # TensorProto.DataType
_ATTR_FLOAT, _ATTR_INT, _ATTR_INTS = 1, 2, 7

Weights = Callable[[str, tuple[int, ...]], np.ndarray]


def random_weights(seed: int) -> Weights:
    """Small normal weights (norm scales near 1): values that keep every activation finite."""
    rng = np.random.default_rng(seed)

    def draw(name: str, shape: tuple[int, ...]) -> np.ndarray:
        scale = 1.0 if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")) else 0.0
        return (scale + 0.02 * rng.standard_normal(shape)).astype(np.float32)

    return draw


# ---- protobuf wire format: the ONNX messages a graph needs (field numbers from onnx.proto) ----

def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1            # negative int64: ten-byte two's complement, as protobuf encodes it
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, data: bytes | str) -> bytes:
    data = data.encode() if isinstance(data, str) else data
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _tensor(name: str, array: np.ndarray) -> bytes:
    """TensorProto: dims (1), data_type (2), name (8), raw_data (9, little-endian)."""
    dtype = {np.dtype(np.float32): _FLOAT, np.dtype(np.int64): _INT64}[array.dtype]
    return (b"".join(_int(1, d) for d in array.shape) + _int(2, dtype) + _bytes(8, name)
            + _bytes(9, np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()))


def _attribute(name: str, value: int | float | Sequence[int]) -> bytes:
    """AttributeProto: name (1), f (2), i (3), ints (8), type (20)."""
    if isinstance(value, float):
        return _bytes(1, name) + _varint(2 << 3 | 5) + struct.pack("<f", value) + _int(20, _ATTR_FLOAT)
    if isinstance(value, int):
        return _bytes(1, name) + _int(3, value) + _int(20, _ATTR_INT)
    return _bytes(1, name) + b"".join(_int(8, v) for v in value) + _int(20, _ATTR_INTS)


def _value_info(name: str, shape: Sequence[int | str]) -> bytes:
    """ValueInfoProto (name 1, type 2) of a float tensor; a str dimension is symbolic (dim_param)."""
    dims = b"".join(_bytes(1, _bytes(2, d) if isinstance(d, str) else _int(1, d)) for d in shape)
    tensor_type = _int(1, _FLOAT) + _bytes(2, dims)
    return _bytes(1, name) + _bytes(2, _bytes(1, tensor_type))


class GraphBuilder:
    """Nodes and initializers of one graph, serialized to an ONNX model by :meth:`model`."""

    def __init__(self, weights: Weights):
        self.weights = weights
        self.nodes: list[bytes] = []
        self.initializers: list[bytes] = []
        self.count = 0

    def constant(self, array: np.ndarray) -> str:
        name = f"c{len(self.initializers)}"
        self.initializers.append(_tensor(name, array))
        return name

    def weight(self, name: str, shape: tuple[int, ...], transpose: bool = False) -> str:
        """timm's tensor ``name`` of ``shape``; ``transpose``: stored as its transpose (a MatMul's right side)."""
        array = np.asarray(self.weights(name, shape), dtype=np.float32)
        if array.shape != shape:
            raise ValueError(f"weight {name}: expected shape {shape}, got {array.shape}")
        self.initializers.append(_tensor(name, array.T if transpose else array))
        return name

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attributes):
        """Add a node; its output's name (a tuple of ``outputs`` names when more than one)."""
        self.count += 1
        names = tuple(f"v{self.count}_{i}" if outputs > 1 else f"v{self.count}" for i in range(outputs))
        self.nodes.append(b"".join(_bytes(1, i) for i in inputs) + b"".join(_bytes(2, n) for n in names)
                          + _bytes(3, f"n{self.count}") + _bytes(4, op_type)
                          + b"".join(_bytes(5, _attribute(k, v)) for k, v in attributes.items()))
        return names if outputs > 1 else names[0]

    def model(self, input_name: str, input_shape: Sequence[int | str], output: str,
              output_shape: Sequence[int | str]) -> bytes:
        """The ModelProto: ir_version (1), producer_name (2), graph (7), opset_import (8)."""
        if output == input_name:    # an empty graph still needs a node between its input and output
            output = self.op("Identity", output)
        graph = (b"".join(_bytes(1, n) for n in self.nodes) + _bytes(2, "tapvits-profile")
                 + b"".join(_bytes(5, t) for t in self.initializers)
                 + _bytes(11, _value_info(input_name, input_shape)) + _bytes(12, _value_info(output, output_shape)))
        return (_int(1, IR_VERSION) + _bytes(2, "tapvits") + _bytes(7, graph)
                + _bytes(8, _bytes(1, "") + _int(2, OPSET)))

    # ---- the layers, as torch's exporter writes them ----

    def linear(self, x: str, prefix: str, out_features: int, in_features: int, bias: bool = True) -> str:
        y = self.op("MatMul", x, self.weight(f"{prefix}.weight", (out_features, in_features), transpose=True))
        return self.op("Add", y, self.weight(f"{prefix}.bias", (out_features,))) if bias else y

    def layer_norm(self, x: str, prefix: str, dim: int, eps: float) -> str:
        return self.op("LayerNormalization", x, self.weight(f"{prefix}.weight", (dim,)),
                       self.weight(f"{prefix}.bias", (dim,)), axis=-1, epsilon=float(eps))

    def gelu(self, x: str) -> str:
        """The exact (erf) GELU: x · ½ · (1 + erf(x / √2))."""
        erf = self.op("Erf", self.op("Div", x, self.constant(np.array(math.sqrt(2.0), dtype=np.float32))))
        inner = self.op("Mul", x, self.op("Add", erf, self.constant(np.array(1.0, dtype=np.float32))))
        return self.op("Mul", inner, self.constant(np.array(0.5, dtype=np.float32)))


def _attention(g: GraphBuilder, x: str, prefix: str, arch: Architecture, heads: int, head_dim: int) -> str:
    """timm ``Attention`` as torch's exporter writes it: the batch and token counts read from the input's shape
    at run time (the batch axis is symbolic) for both reshapes, q, k, v split off and squeezed, √scale applied
    to q and to kᵀ, softmax(q·kᵀ)·v, then ``proj``. The run-time shape nodes cost little per call, but a
    small model at batch 1 runs hundreds of them, so the profile keeps them."""
    def dimension(index: int) -> str:   # a 1-element int64 tensor: x's size along ``index``
        size = g.op("Gather", g.op("Shape", x), g.constant(np.array(index, dtype=np.int64)), axis=0)
        return g.op("Unsqueeze", size, g.constant(np.array([0], dtype=np.int64)))

    batch, tokens = dimension(0), dimension(1)
    qkv = g.linear(x, f"{prefix}.qkv", 3 * heads * head_dim, arch.dim, bias=arch.qkv_bias)
    qkv = g.op("Reshape", qkv, g.op("Concat", batch, tokens, g.constant(np.array([3, heads, head_dim], dtype=np.int64)),
                                    axis=0))
    qkv = g.op("Transpose", qkv, perm=[2, 0, 3, 1, 4])
    parts = g.op("Split", qkv, g.constant(np.array([1, 1, 1], dtype=np.int64)), axis=0, outputs=3)
    q, k, v = (g.op("Squeeze", part, g.constant(np.array([0], dtype=np.int64))) for part in parts)
    root_scale = g.constant(np.array(head_dim ** -0.25, dtype=np.float32))
    q, k = g.op("Mul", q, root_scale), g.op("Mul", g.op("Transpose", k, perm=[0, 1, 3, 2]), root_scale)
    scores = g.op("Softmax", g.op("MatMul", q, k), axis=-1)
    out = g.op("Transpose", g.op("MatMul", scores, v), perm=[0, 2, 1, 3])
    out = g.op("Reshape", out, g.op("Concat", batch, tokens, g.constant(np.array([-1], dtype=np.int64)), axis=0))
    return g.linear(out, f"{prefix}.proj", arch.dim, heads * head_dim)


def _mlp(g: GraphBuilder, x: str, prefix: str, arch: Architecture, hidden: int) -> str:
    return g.linear(g.gelu(g.linear(x, f"{prefix}.fc1", hidden, arch.dim)), f"{prefix}.fc2", arch.dim, hidden)


def blocks_graph(arch: Architecture, widths: Sequence[BlockWidths], tokens: int, weights: Weights) -> bytes:
    """Blocks ``0..len(widths)-1`` at those widths, (batch, tokens, dim) → (batch, tokens, dim).

    A branch of width 0 is absent, as ``prune`` removes it (its norm and layer scale too).
    """
    g = GraphBuilder(weights)
    x = "x"
    for index, width in enumerate(widths):
        for kind, units in (("attn", width.heads), ("mlp", width.mlp_hidden)):
            if units == 0:
                continue
            norm = g.layer_norm(x, f"blocks.{index}.{'norm1' if kind == 'attn' else 'norm2'}", arch.dim, arch.eps)
            branch = (_attention(g, norm, f"blocks.{index}.attn", arch, units, width.head_dim) if kind == "attn"
                      else _mlp(g, norm, f"blocks.{index}.mlp", arch, units))
            if arch.layer_scale:
                branch = g.op("Mul", branch, g.weight(f"blocks.{index}.{'ls1' if kind == 'attn' else 'ls2'}.gamma",
                                                      (arch.dim,)))
            x = g.op("Add", x, branch)
    return g.model("x", ("batch", tokens, arch.dim), x, ("batch", tokens, arch.dim))


def stem_graph(arch: Architecture, weights: Weights) -> bytes:
    """Patch embedding, prefix tokens and position embedding: images (batch, C, H, W) → (batch, tokens, dim)."""
    g = GraphBuilder(weights)
    channels, height, width = arch.input_size
    p = arch.patch_size
    x = g.op("Conv", "images", g.weight("patch_embed.proj.weight", (arch.dim, channels, p, p)),
             g.weight("patch_embed.proj.bias", (arch.dim,)), kernel_shape=[p, p], strides=[p, p])
    x = g.op("Transpose", g.op("Reshape", x, g.constant(np.array([0, 0, -1], dtype=np.int64))), perm=[0, 2, 1])
    patches = arch.tokens - arch.prefix_tokens
    positions = g.weight("pos_embed", (1, arch.tokens if arch.pos_embed_prefix else patches, arch.dim))
    if not arch.pos_embed_prefix:
        x = g.op("Add", x, positions)
    if arch.prefix_tokens:   # the class token, then the register tokens, each expanded to the batch
        batch = g.op("Shape", x, start=0, end=1)
        prefix = []
        for name, count in (("cls_token", int(arch.class_token)), ("reg_token", arch.prefix_tokens - arch.class_token)):
            if count:
                shape = g.op("Concat", batch, g.constant(np.array([count, arch.dim], dtype=np.int64)), axis=0)
                prefix.append(g.op("Expand", g.weight(name, (1, count, arch.dim)), shape))
        x = g.op("Concat", *prefix, x, axis=1)
    if arch.pos_embed_prefix:
        x = g.op("Add", x, positions)
    return g.model("images", ("batch", channels, height, width), x, ("batch", arch.tokens, arch.dim))


def tail_graph(arch: Architecture, tokens: int, weights: Weights) -> bytes:
    """Final norm, pooling, ``fc_norm`` and classifier: (batch, tokens, dim) → (batch, classes or dim)."""
    g = GraphBuilder(weights)
    x = g.layer_norm("x", "norm", arch.dim, arch.eps) if arch.final_norm else "x"
    if arch.global_pool == "token":
        x = g.op("Gather", x, g.constant(np.array(0, dtype=np.int64)), axis=1)
    else:   # the mean over the patch tokens (prefix tokens left out)
        x = g.op("Slice", x, g.constant(np.array([arch.prefix_tokens], dtype=np.int64)),
                 g.constant(np.array([tokens], dtype=np.int64)), g.constant(np.array([1], dtype=np.int64)))
        x = g.op("ReduceMean", x, axes=[1], keepdims=0)
    if arch.fc_norm:
        x = g.layer_norm(x, "fc_norm", arch.dim, arch.eps)
    if arch.num_classes:
        x = g.op("Gemm", x, g.weight("head.weight", (arch.num_classes, arch.dim)),
                 g.weight("head.bias", (arch.num_classes,)), transB=1)
    return g.model("x", ("batch", tokens, arch.dim), x, ("batch", arch.num_classes or arch.dim))
