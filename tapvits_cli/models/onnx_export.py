"""ONNX export of a loaded model, checked against PyTorch with onnxruntime.

Pure: a module in, the ONNX file's bytes out; writing the file is the
caller's (through ``artifacts.external.write_export``). ONNX is an export format, not a
tapvits artifact kind: the file is for runtimes, and tapvits only stamps its provenance
into ``metadata_props`` (``artifacts.external.export_provenance``; protocol/README.md, "Exports").

torch's TorchScript exporter (``dynamo=False``) is used: it traces timm ViTs, pruned
or not, with no package beyond ``onnx`` and ``onnxruntime`` (the ``onnx`` extra), and
its batch axis can be left symbolic. Token-merging models export too (from opset 16): their
per-block token counts are fixed by the input size, so the graph stays static but for the batch.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

from tapvits_cli.errors import DataUnavailableError, ExportError, UsageError

INPUT_NAME, OUTPUT_NAME = "images", "logits"
DEFAULT_OPSET = 17
MERGING_OPSET = 16   # token merging sums tokens with ScatterElements(reduction="add"), new in opset 16
TOLERANCE = 1e-4


def require_onnx():
    """``(onnx, onnxruntime)``, or a clear line on how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise DataUnavailableError(
            f"ONNX export needs onnx and onnxruntime ({exc.name or 'onnx'} is missing): pip install \"tapvits[onnx]\""
        ) from None
    return onnx, onnxruntime


def export_onnx(model, input_shape: Sequence[int], batch_size: int = 1, dynamic_batch: bool = True,
                opset: int = DEFAULT_OPSET, metadata: Mapping[str, str] | None = None,
                output_name: str = OUTPUT_NAME) -> bytes:
    """The serialised ONNX model of ``model`` (eval mode) for images of ``(C, H, W)`` ``input_shape``.

    With ``dynamic_batch`` the batch axis is named ``batch`` and any batch size runs;
    otherwise the graph is fixed to ``batch_size``. ``metadata`` goes into ``metadata_props``.
    """
    import torch

    from tapvits_cli.models.token_merging import token_merging_of

    onnx, _ = require_onnx()
    if token_merging_of(model) is not None and opset < MERGING_OPSET:
        raise UsageError(f"a token-merging model needs ONNX opset {MERGING_OPSET} or later (summing scatter): "
                         f"use --opset {MERGING_OPSET}")
    model.eval()
    example = torch.zeros(batch_size, *input_shape)
    axes = {INPUT_NAME: {0: "batch"}, output_name: {0: "batch"}} if dynamic_batch else None
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the legacy-exporter notice and timm's trace-time asserts are noise here
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[output_name], dynamic_axes=axes)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            raise ExportError(f"torch could not export the model to ONNX opset {opset} ({reason})") from None
    graph = onnx.load_from_string(buffer.getvalue())
    for key, value in sorted((metadata or {}).items()):
        graph.metadata_props.add(key=key, value=value)
    return graph.SerializeToString()


@dataclass(frozen=True)
class CheckResult:
    batch_sizes: tuple[int, ...]
    max_abs_diff: float


def check_onnx(model, onnx_bytes: bytes, input_shape: Sequence[int], batch_sizes: Sequence[int],
               seed: int = 0, tolerance: float = TOLERANCE, output_name: str = OUTPUT_NAME) -> CheckResult:
    """Run the ONNX graph with onnxruntime (CPU) on seeded random batches and compare with PyTorch.

    A difference above ``tolerance`` means the exporter or runtime changed the
    computation, which no option of the user's caused: :class:`ExportError`.
    """
    import torch

    onnx, onnxruntime = require_onnx()
    onnx.checker.check_model(onnx.load_from_string(onnx_bytes))
    session = onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch in batch_sizes:
        images = torch.randn(batch, *input_shape, generator=generator)
        with torch.no_grad():
            expected = model.eval()(images).float().numpy()
        actual = session.run([output_name], {INPUT_NAME: images.numpy()})[0]
        if actual.shape != expected.shape:
            raise ExportError(f"the ONNX graph returns shape {actual.shape} for batch {batch}, "
                              f"PyTorch {expected.shape}")
        worst = max(worst, float(abs(actual - expected).max()))
    if not worst <= tolerance:
        raise ExportError(f"the ONNX graph differs from PyTorch by {worst:.3g} (tolerance {tolerance:g}); this is a "
                          "bug in the exporter: please report it, or pass --no-check to write the file unchecked")
    return CheckResult(tuple(batch_sizes), worst)

