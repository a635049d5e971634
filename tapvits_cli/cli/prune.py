"""``tapvits prune``: a model and a plan made for it → the physically smaller model artifact,
optionally with token merging set (or cleared) — also on a model without a plan."""

from __future__ import annotations

import re

import click

from tapvits_cli.cli.options import WritingCommand, global_options, integer_ranges
from tapvits_cli.cli.output import emit
from tapvits_cli.stages.prune import NO_MERGING
from tapvits_cli.vocabulary import MERGE_METHODS

MAX_BLOCK_INDEX = 4095   # far beyond any model's depth; a range is bounded before it is expanded


def parse_schedule(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    """'8,8,4,0' → one non-negative amount per block."""
    if value is None:
        return None
    if not re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", value):
        raise click.BadParameter(f"expected one integer >= 0 per block, comma-separated, got {value!r}")
    return tuple(int(item) for item in value.split(","))


@click.command("prune", cls=WritingCommand, short_help="Apply a plan: slice neurons and heads into a smaller model; set token merging.")
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True, dir_okay=False))
@click.argument("plan_path", metavar="[PLAN]", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Pruned model artifact to write (.safetensors).")
@click.option("--merge", type=click.Choice([*MERGE_METHODS, NO_MERGING]), default=None,
              help="Token merging of the result: bipartite (ToMe), neighbour (adjacent columns/rows, keeps a grid), "
                   "or none to remove it  [default: MODEL's setting]")
@click.option("--merge-amount", type=click.IntRange(min=0), default=None, metavar="N",
              help="In each merging block: tokens removed (bipartite) or pairs of adjacent columns/rows merged "
                   "(neighbour).")
@click.option("--merge-layers", callback=integer_ranges(0, "block indices like 0-5 or 1,3,5", MAX_BLOCK_INDEX),
              default=None, metavar="BLOCKS",
              help="Blocks that merge, with --merge-amount, e.g. 0-5 or 1,3,5  [default: all]")
@click.option("--merge-schedule", callback=parse_schedule, default=None, metavar="A0,A1,…",
              help="One amount per block (0: no merge there), instead of --merge-amount.")
@click.option("--proportional-attention/--no-proportional-attention", default=None,
              help="Add log(token size) to attention logits so a merged token keeps the weight of the tokens it "
                   "stands for  [default: on]")
@global_options
def command(model_path: str, plan_path: str | None, output: str, merge: str | None, merge_amount: int | None,
            merge_layers: list[int] | None, merge_schedule: tuple[int, ...] | None,
            proportional_attention: bool | None) -> None:
    """Slice the MLP neurons and attention heads PLAN drops out of MODEL; set its token merging.

    Kept heads keep their q, k, v rows and proj columns (and, in Swin, their relative
    position bias column), kept neurons their fc1 rows and fc2 columns; a block that keeps
    no head (or no neuron) loses that whole branch. The result is an ordinary model
    artifact with per-block widths, which `finetune`, `eval`, `export` and `load_model`
    rebuild with no pickle. PLAN must have been made for MODEL's weights.

    Token merging (ViT/DeiT only) is stored in the artifact and runs wherever it is loaded:
    in each block, between attention and MLP, tokens merge into size-weighted means (the
    class token never). --merge bipartite removes N tokens per block (ToMe's bipartite
    matching of attention keys); --merge neighbour merges N pairs of adjacent columns or
    rows per block, so the tokens stay a grid. Without --merge the result keeps MODEL's
    setting; --merge none removes it. Without PLAN nothing is sliced: only the merging
    changes (the weights, and plans made for them, stay valid).

    Examples:

      tapvits prune base.safetensors device.plan.safetensors -o device.pruned.safetensors

      tapvits prune base.safetensors device.plan.safetensors --merge bipartite --merge-amount 8 -o fast.safetensors

      tapvits prune device.pruned.safetensors --merge neighbour --merge-amount 1 --merge-layers 0-7 -o grid.safetensors

      tapvits prune fast.safetensors --merge none -o unmerged.safetensors
    """
    from tapvits_cli.cli.stage_call import run_stage
    from tapvits_cli.stages import prune

    result = run_stage(prune)
    emit(result.document, result.output)
