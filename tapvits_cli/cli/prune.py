"""``tapvits prune``: a model and a plan made for it → the physically smaller model artifact,
optionally with token merging set (or cleared) — also on a model without a plan."""

from __future__ import annotations

import re
from pathlib import Path

import click

from tapvits_cli.cli.options import WritingCommand, global_options
from tapvits_cli.cli.output import emit, log
from tapvits_cli.errors import IncompatibleArtifactError, UsageError
from tapvits_cli.vocabulary import MERGE_METHODS



def parse_blocks(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    """'0-5', '3' or '1,3,5-7' → sorted distinct block indices."""
    if value is None:
        return None
    blocks: set[int] = set()
    for item in value.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", item)
        if not match or int(match[2] or match[1]) < int(match[1]):
            raise click.BadParameter(f"expected block indices like 0-5 or 1,3,5, got {value!r}")
        blocks.update(range(int(match[1]), int(match[2] or match[1]) + 1))
    return sorted(blocks)


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
@click.option("--merge", type=click.Choice([*MERGE_METHODS, "none"]), default=None,
              help="Token merging of the result: bipartite (ToMe), neighbour (adjacent columns/rows, keeps a grid), "
                   "or none to remove it  [default: MODEL's setting]")
@click.option("--merge-amount", type=click.IntRange(min=0), default=None, metavar="N",
              help="In each merging block: tokens removed (bipartite) or pairs of adjacent columns/rows merged "
                   "(neighbour).")
@click.option("--merge-layers", callback=parse_blocks, default=None, metavar="BLOCKS",
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
    from dataclasses import replace

    from tapvits_cli.artifacts.files import sha256_file
    from tapvits_cli.artifacts.header import LineageEntry
    from tapvits_cli.artifacts.model import load_model, write_model
    from tapvits_cli.artifacts.plan import read_plan
    from tapvits_cli.models.factory import count_parameters, describe_model
    from tapvits_cli.models.spec import TokenMerging
    from tapvits_cli.models.token_merging import set_token_merging, token_grid
    from tapvits_cli.pruning import prune_model

    _check_merge_options(plan_path, merge, merge_amount, merge_layers, merge_schedule, proportional_attention)
    model, spec, artifact = load_model(model_path)
    inputs = {"model": LineageEntry(sha256_file(model_path), "model", Path(model_path).name)}
    params = {}
    result = model
    if plan_path:
        plan = read_plan(plan_path)
        weights = artifact.metadata["model.weights_sha256"]
        if plan.model_sha256 != weights or plan.base_blocks != spec.blocks:
            raise IncompatibleArtifactError(f"{plan_path} was made for the model with weights {plan.model_sha256[:12]}, "
                                            f"{model_path} has {weights[:12]}: score and allocate this model first")
        result = prune_model(model, plan.keep)
        inputs["plan"] = LineageEntry(sha256_file(plan_path), "plan", Path(plan_path).name)
        params = {"strategy": plan.strategy, "budget": dict(plan.budget)}
    if merge == "none":
        set_token_merging(result, None)
    elif merge is not None:
        proportional = proportional_attention is not False
        merging = (TokenMerging(merge, merge_schedule, proportional) if merge_schedule is not None else
                   TokenMerging.uniform(merge, merge_amount, len(spec.blocks), merge_layers, proportional))
        set_token_merging(result, merging)
    described = describe_model(result, spec.architecture, spec.kwargs)
    result_spec = replace(spec, blocks=described.blocks, token_merging=described.token_merging)
    merging = result_spec.token_merging
    tokens = list(merging.token_counts(*token_grid(result))) if merging else None
    before, after = count_parameters(model), count_parameters(result)
    params = {"params_before": before, "params_after": after, **params,
              "token_merging": merging.to_dict() if merging else None}
    path = write_model(output, result, result_spec, params, inputs)
    log(f"{after:,} of {before:,} parameters ({after / before:.4f}); heads per block "
        f"{[b.heads for b in result_spec.blocks]}, MLP widths {[b.mlp_hidden for b in result_spec.blocks]}", level=1)
    if merging:
        log(f"token merging ({merging.method}): tokens after each block {tokens}", level=1)
    emit({"output": str(path), "kind": "model", "params_before": before, "params_after": after,
          "params_fraction": after / before, "blocks": [b.to_dict() for b in result_spec.blocks],
          "token_merging": merging.to_dict() if merging else None, "tokens_per_block": tokens}, str(path))


def _check_merge_options(plan_path, merge, amount, layers, schedule, proportional) -> None:
    """Which combinations of PLAN and the merge options mean something; one line on what would work."""
    details = amount is not None or layers is not None or schedule is not None or proportional is not None
    if merge is None and details:
        raise UsageError("--merge-amount, --merge-layers, --merge-schedule and --proportional-attention need "
                         "--merge bipartite|neighbour")
    if merge == "none" and details:
        raise UsageError("--merge none removes token merging: drop the other --merge-*/--proportional-attention options")
    if merge in MERGE_METHODS and (amount is None) == (schedule is None):
        raise UsageError(f"--merge {merge} needs either --merge-amount N (optionally with --merge-layers) or "
                         "--merge-schedule A0,A1,…")
    if layers is not None and schedule is not None:
        raise UsageError("--merge-layers goes with --merge-amount; --merge-schedule already gives every block's amount")
    if plan_path is None and merge is None:
        raise UsageError("nothing to do: give a PLAN to prune with, --merge METHOD|none to set token merging, or both")
