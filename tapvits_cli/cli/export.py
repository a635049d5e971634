"""``tapvits export``: an ONNX file from a model artifact, checked against PyTorch."""

from __future__ import annotations

import os

import click

from tapvits_cli.cli.options import CURRENT, WritingCommand, global_options
from tapvits_cli.cli.output import emit, log
from tapvits_cli.errors import UsageError
from tapvits_cli.models.onnx_export import DEFAULT_OPSET, TOLERANCE   # light: torch and onnx load inside functions


def parse_raw_input(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int, int] | None:
    """'1,28,28' → (1, 28, 28)."""
    if value is None:
        return None
    try:
        shape = tuple(int(v) for v in value.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise click.BadParameter(f"expected C,H,W of positive integers such as 1,28,28, got {value!r}")
    return shape


@click.command("export", cls=WritingCommand, short_help="Export a model artifact to ONNX, checked with onnxruntime.")
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="ONNX file to write (.onnx).")
@click.option("--features", "features_graph", is_flag=True,
              help="Export the feature extractor instead (preprocessing included, output `features`): "
                   "what `fit-gmm --extractor FILE.onnx` runs on a device without torch. MODEL may then also be "
                   "a built-in extractor (efficientnet-lite0).")
@click.option("--raw-input", callback=parse_raw_input, metavar="C,H,W",
              help="With --features: the stored images the graph takes, e.g. 1,28,28 for Fashion-MNIST  "
                   "[default: the model's input size]")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Batch size of the example input (the fixed batch with --static-batch).")
@click.option("--dynamic-batch/--static-batch", default=True, show_default=True,
              help="Leave the batch axis symbolic, or fix it to --batch-size.")
@click.option("--opset", type=click.IntRange(14, 20), default=DEFAULT_OPSET, show_default=True,
              help="ONNX opset version: 14 (fused attention) to 20 (torch's TorchScript exporter).")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Compare onnxruntime's outputs with PyTorch's on seeded random images (max abs diff <= 1e-4).")
@global_options
def command(model: str, output: str, features_graph: bool, raw_input: tuple[int, int, int] | None, batch_size: int,
            dynamic_batch: bool, opset: int, check: bool) -> None:
    """Export the MODEL artifact (pruned or not) to an ONNX file.

    The input is a float image batch named `images` of the model's preprocessing
    input size (N, C, H, W), already resized and normalised; the output is `logits`.
    With --features the graph is the feature extractor instead: its input is the
    dataset's stored images, floats in [0, 1] of shape (N, C', H', W') (--raw-input),
    and it resizes, maps channels, normalises and returns the pooled pre-logits
    `features`, exactly as fit-gmm, features and select compute them; its
    metadata_props carry the extractor fingerprint, so a GMM fitted through it is
    accepted by the cloud. The file's metadata_props carry the source's lineage,
    architecture and preprocessing (protocol/README.md, "Exports"). Export runs on the
    CPU. Needs the optional extra: pip install "tapvits[onnx]".

    Example: tapvits export base.safetensors --features --raw-input 1,28,28 -o extractor.onnx
    """
    from tapvits_cli.artifacts.external import write_export
    from tapvits_cli.models.onnx_export import check_onnx, export_onnx, require_onnx

    require_onnx()
    if raw_input is not None and not features_graph:
        raise UsageError("--raw-input applies to --features graphs only")
    params = {"batch_size": batch_size, "dynamic_batch": dynamic_batch, "opset": opset, "check": check,
              "tolerance": TOLERANCE, "seed": CURRENT.seed, "device": "cpu"}
    if features_graph:
        module, input_shape, output_name, metadata = _features_graph(model, raw_input, params)
    else:
        module, input_shape, output_name, metadata = _logits_graph(model, params)
    data = export_onnx(module, input_shape, batch_size, dynamic_batch, opset, metadata, output_name=output_name)
    result = {"kind": "onnx", "graph": output_name, "opset": opset,
              "input_shape": ["batch" if dynamic_batch else batch_size, *input_shape]}
    if check:
        batches = (batch_size, batch_size + 2) if dynamic_batch else (batch_size,)
        checked = check_onnx(module, data, input_shape, batches, seed=CURRENT.seed, output_name=output_name)
        result.update(checked_batch_sizes=list(checked.batch_sizes), max_abs_diff=checked.max_abs_diff)
        log(f"onnxruntime matches PyTorch at batch {', '.join(map(str, batches))}: "
            f"max abs diff {checked.max_abs_diff:.2e}")
    path = write_export(output, data)
    emit({"output": str(path), **result}, str(path))


def _logits_graph(model: str, params: dict):
    """The classifier: normalised images in, logits out."""
    from tapvits_cli.artifacts.files import sha256_file
    from tapvits_cli.artifacts.header import LineageEntry
    from tapvits_cli.artifacts.model import load_model
    from tapvits_cli.artifacts.external import export_provenance
    from tapvits_cli.models.onnx_export import OUTPUT_NAME

    if not os.path.isfile(model):
        raise UsageError(f"MODEL '{model}' is not a file (a built-in extractor exports only with --features)")
    module, spec, artifact = load_model(model, device="cpu")
    source = LineageEntry(sha256_file(model), "model", click.format_filename(model, shorten=True))
    return module, tuple(spec.preprocessing["input_size"]), OUTPUT_NAME, export_provenance(artifact.metadata, source, params)


def _features_graph(model: str, raw_input: tuple[int, int, int] | None, params: dict):
    """The feature extractor, preprocessing included: stored images in, pooled features out."""
    from tapvits_cli.artifacts.external import features_graph_provenance
    from tapvits_cli.stages.extractor import resolve_extractor
    from tapvits_cli.models.extract import feature_graph
    from tapvits_cli.models.onnx_extractor import FEATURES_OUTPUT, OnnxExtractor

    extractor, lineage = resolve_extractor(model, "cpu")
    if isinstance(extractor, OnnxExtractor):
        raise UsageError(f"{model} is already an ONNX extractor")
    shape = raw_input or tuple(extractor.preprocessing.input_size)
    model_metadata = {}
    if os.path.isfile(model):
        from tapvits_cli.artifacts.containers import open_file

        model_metadata = open_file(model).metadata
    metadata = features_graph_provenance(model_metadata, lineage, params, extractor.fingerprint, shape)
    return feature_graph(extractor), shape, FEATURES_OUTPUT, metadata
