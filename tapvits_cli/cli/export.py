"""``tapvits export``: an ONNX file from a model artifact, checked against PyTorch."""

from __future__ import annotations

import click

from tapvits_cli.cli.options import CURRENT, WritingCommand, global_options
from tapvits_cli.cli.output import emit, log
from tapvits_cli.models.onnx_export import DEFAULT_OPSET, TOLERANCE   # light: torch and onnx load inside functions


@click.command("export", cls=WritingCommand, short_help="Export a model artifact to ONNX, checked with onnxruntime.")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="ONNX file to write (.onnx).")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Batch size of the example input (the fixed batch with --static-batch).")
@click.option("--dynamic-batch/--static-batch", default=True, show_default=True,
              help="Leave the batch axis symbolic, or fix it to --batch-size.")
@click.option("--opset", type=click.IntRange(14, 20), default=DEFAULT_OPSET, show_default=True,
              help="ONNX opset version: 14 (fused attention) to 20 (torch's TorchScript exporter).")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Compare onnxruntime's outputs with PyTorch's on seeded random images (max abs diff <= 1e-4).")
@global_options
def command(model: str, output: str, batch_size: int, dynamic_batch: bool, opset: int, check: bool) -> None:
    """Export the MODEL artifact (pruned or not) to an ONNX file.

    The input is a float image batch named `images` of the model's preprocessing
    input size (N, C, H, W), already resized and normalised; the output is `logits`.
    The file's metadata_props carry the source model's lineage, architecture, per-block
    widths and preprocessing (protocol/README.md, "Exports"). Export runs on the CPU.
    Needs the optional extra: pip install "tapvits[onnx]".

    Example: tapvits export pruned.safetensors -o pruned.onnx
    """
    from tapvits_cli.artifacts.external import write_export
    from tapvits_cli.artifacts.files import sha256_file
    from tapvits_cli.artifacts.header import LineageEntry
    from tapvits_cli.artifacts.model import load_model
    from tapvits_cli.models.onnx_export import check_onnx, export_onnx, provenance, require_onnx

    require_onnx()
    module, spec, artifact = load_model(model, device="cpu")
    input_shape = tuple(spec.preprocessing["input_size"])
    source = LineageEntry(sha256_file(model), "model", click.format_filename(model, shorten=True))
    params = {"batch_size": batch_size, "dynamic_batch": dynamic_batch, "opset": opset, "check": check,
              "tolerance": TOLERANCE, "seed": CURRENT.seed, "device": "cpu"}
    data = export_onnx(module, input_shape, batch_size, dynamic_batch, opset,
                       provenance(artifact.metadata, source, params))
    result = {"kind": "onnx", "opset": opset, "input_shape": ["batch" if dynamic_batch else batch_size, *input_shape]}
    if check:
        batches = (batch_size, batch_size + 2) if dynamic_batch else (batch_size,)
        checked = check_onnx(module, data, input_shape, batches, seed=CURRENT.seed)
        result.update(checked_batch_sizes=list(checked.batch_sizes), max_abs_diff=checked.max_abs_diff)
        log(f"onnxruntime matches PyTorch at batch {', '.join(map(str, batches))}: "
            f"max abs diff {checked.max_abs_diff:.2e}")
    path = write_export(output, data)
    emit({"output": str(path), **result}, str(path))
