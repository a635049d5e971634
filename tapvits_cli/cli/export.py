"""``tapvits export``: an ONNX file from a model artifact, checked against PyTorch."""

from __future__ import annotations

import click

from tapvits_cli.cli.options import WritingCommand, global_options
from tapvits_cli.cli.output import emit
from tapvits_cli.models.onnx_export import DEFAULT_OPSET
from tapvits_cli.vocabulary import MAX_BATCH


def parse_raw_input(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int, int] | None:
    """'1,28,28' → (1, 28, 28): 1 or 3 channels (what the graph's preprocessing maps to the model's),
    and no more pixels than an image a folder dataset may hold."""
    from tapvits_cli.artifacts.header import parse_decimal
    from tapvits_cli.data.sources import MAX_IMAGE_PIXELS

    if value is None:
        return None
    try:
        shape = tuple(parse_decimal(v) for v in value.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or shape[0] not in (1, 3) or min(shape) < 1 or shape[1] * shape[2] > MAX_IMAGE_PIXELS:
        raise click.BadParameter(f"expected C,H,W with C 1 or 3 and H×W at most {MAX_IMAGE_PIXELS} pixels, such as "
                                 f"1,28,28; got {value!r}")
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
@click.option("--batch-size", type=click.IntRange(1, MAX_BATCH), default=1, show_default=True,
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
    from tapvits_cli.cli.stage_call import run_stage
    from tapvits_cli.stages import export

    result = run_stage(export)
    emit(result.document, result.output)
