"""``tapvits profile``: a model's architecture → this device's latency table (a profile artifact)."""

from __future__ import annotations

import os

import click

from tapvits_cli.cli.options import WritingCommand, checked_by, global_options
from tapvits_cli.cli.output import emit
from tapvits_cli.stages.profile import AUTO_RUNTIME, parse_batch_sizes, parse_mlp_widths
from tapvits_cli.vocabulary import MAX_TOKENS, RUNTIMES


@click.command("profile", cls=WritingCommand, renamed={"--warmup": "--warmup-runs"},
               short_help="Measure this device's latency for a model's blocks at every prunable width.")
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Profile artifact to write (.json).")
@click.option("--runtime", type=click.Choice([AUTO_RUNTIME, *RUNTIMES]), default=AUTO_RUNTIME,
              help="Runtime the blocks run on; onnxruntime (CPU provider) builds them as ONNX graphs with NumPy "
                   "alone, so the device install profiles too  [default: torch where installed, else onnxruntime]")
@click.option("--batch-sizes", default="1,32", show_default=True, metavar="B,B", help="Batch sizes to measure.",
              callback=checked_by(parse_batch_sizes))
@click.option("--tokens", type=click.IntRange(1, MAX_TOKENS), metavar="N",
              help="Tokens per image in the blocks and the head  [default: the model's input's]")
@click.option("--widths", metavar="W,W", callback=checked_by(parse_mlp_widths),
              help="MLP hidden widths to measure, multiples of --mlp-alignment  [default: the alignment and 8 "
                   "evenly spaced multiples of it up to the full width]; heads are measured at every count")
@click.option("--mlp-alignment", type=click.IntRange(1), default=8, show_default=True, metavar="N",
              help="Also measure the MLP one neuron below each width (and at 1), the curve for widths that are not "
                   "multiples of N, which run slower; 1: one curve for every width.")
@click.option("--repeats", type=click.IntRange(1), default=20, show_default=True,
              help="Timed rounds (the median is kept).")
@click.option("--warmup-runs", type=click.IntRange(0), default=5, show_default=True, help="Untimed rounds first.")
@click.option("--threads", type=click.IntRange(1, os.cpu_count() or 1), metavar="T",
              help="Intra-op threads, at most this machine's CPUs (the profile describes the machine it runs on)  "
                   "[default: torch's; on onnxruntime the cores available]")
@global_options
def command(model_path: str, output: str, runtime: str, batch_sizes: str, tokens: int | None, widths: str | None,
            mlp_alignment: int, repeats: int, warmup_runs: int, threads: int | None) -> None:
    """Measure how long this machine takes for MODEL's building blocks at every width pruning
    can produce, and write the table as a profile artifact (protocol/profile.md).

    Each block kind is timed as pruned models build it: attention at every head count
    (MLP removed), the MLP at a grid of hidden widths (attention removed), a block with
    both removed, and the fixed parts (patch embedding, final norm + classifier), at each
    batch size, interleaved over --repeats rounds after --warmup-runs. The MLP grid has
    two curves: multiples of --mlp-alignment and the widths one below them (other widths
    run slower; a pruned width reads the curve of its kind). Only the architecture
    of MODEL matters (pruned or not, the unpruned widths are profiled; weights are not
    used). The latency of any pruned model of that architecture is then predicted from
    the table (tapvits_cli.payloads.latency_table.predict_model). ViT/DeiT models only.

    Without torch (the device install) the blocks run on onnxruntime and the architecture
    is read from MODEL's header; give it the unpruned base model (a pruned one is profiled
    at its architecture's widths, recomputed from the embedding width and mlp_ratio).

    Example: tapvits profile base.safetensors -o device.profile.json --batch-sizes 1,32
    """
    from tapvits_cli.cli.stage_call import run_stage
    from tapvits_cli.stages import profile

    result = run_stage(profile)
    emit(result.document, result.output)
