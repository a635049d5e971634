"""``prune``: a model and a plan made for it → the physically smaller model; token merging set or cleared."""

from __future__ import annotations

from dataclasses import dataclass

from tapvits_cli.errors import IncompatibleArtifactError, UsageError
from tapvits_cli.stages.common import Written as Result, argument, artifact_lineage, comma_list, made_for, option
from tapvits_cli.stages.feedback import log
from tapvits_cli.vocabulary import MERGE_METHODS

NO_MERGING = "none"   # --merge none: remove the model's token merging


@dataclass(frozen=True, kw_only=True)
class Options:
    model_path: str = argument()
    plan_path: str | None = argument(None)
    output: str = option("-o", recipe=False)
    merge: str | None = option("--merge")
    merge_amount: int | None = option("--merge-amount")
    merge_layers: list[int] | None = option("--merge-layers", render=comma_list)
    merge_schedule: tuple[int, ...] | None = option("--merge-schedule", render=comma_list)
    proportional_attention: bool | None = option("--proportional-attention", off="--no-proportional-attention")
    seed: int = 0
    device: str = "auto"


def check_merge_options(options: Options) -> None:
    """Which combinations of PLAN and the merge options mean something; one line on what would work."""
    merge, amount, layers, schedule = options.merge, options.merge_amount, options.merge_layers, options.merge_schedule
    details = amount is not None or layers is not None or schedule is not None or options.proportional_attention is not None
    if merge is None and details:
        raise UsageError("--merge-amount, --merge-layers, --merge-schedule and --proportional-attention need "
                         "--merge bipartite|neighbour")
    if merge == NO_MERGING and details:
        raise UsageError("--merge none removes token merging: drop the other --merge-*/--proportional-attention options")
    if merge in MERGE_METHODS and (amount is None) == (schedule is None):
        raise UsageError(f"--merge {merge} needs either --merge-amount N (optionally with --merge-layers) or "
                         "--merge-schedule A0,A1,…")
    if layers is not None and schedule is not None:
        raise UsageError("--merge-layers goes with --merge-amount; --merge-schedule already gives every block's amount")
    if options.plan_path is None and merge is None:
        raise UsageError("nothing to do: give a PLAN to prune with, --merge METHOD|none to set token merging, or both")


def run(options: Options) -> Result:
    from dataclasses import replace

    from tapvits_cli.artifacts.model import load_model, write_model
    from tapvits_cli.artifacts.plan import read_plan
    from tapvits_cli.models.factory import count_parameters, describe_model
    from tapvits_cli.models.spec import TokenMerging
    from tapvits_cli.models.token_merging import set_token_merging, token_grid
    from tapvits_cli.pruning import prune_model

    check_merge_options(options)
    loaded = load_model(options.model_path)
    model, spec = loaded.module, loaded.spec
    inputs = {"model": artifact_lineage(options.model_path, "model")}
    params = {}
    result = model
    if options.plan_path:
        plan = read_plan(options.plan_path)
        if not made_for(plan.model_sha256, plan.base_blocks, loaded):
            weights = loaded.artifact.metadata["model.weights_sha256"]
            raise IncompatibleArtifactError(f"{options.plan_path} was made for the model with weights "
                                            f"{plan.model_sha256[:12]}, {options.model_path} has {weights[:12]}: "
                                            "score and allocate this model first")
        result = prune_model(model, plan.keep)
        inputs["plan"] = artifact_lineage(options.plan_path, "plan")
        params = {"strategy": plan.strategy, "budget": dict(plan.budget)}
    if options.merge == NO_MERGING:
        set_token_merging(result, None)
    elif options.merge is not None:
        proportional = options.proportional_attention is not False
        merging = (TokenMerging(options.merge, options.merge_schedule, proportional)
                   if options.merge_schedule is not None else
                   TokenMerging.uniform(options.merge, options.merge_amount, len(spec.blocks), options.merge_layers,
                                        proportional))
        set_token_merging(result, merging)
    described = describe_model(result, spec.architecture, spec.kwargs)
    result_spec = replace(spec, blocks=described.blocks, token_merging=described.token_merging)
    merging = result_spec.token_merging
    tokens = list(merging.token_counts(*token_grid(result))) if merging else None
    before, after = count_parameters(model), count_parameters(result)
    params = {"params_before": before, "params_after": after, **params,
              "token_merging": merging.to_dict() if merging else None}
    path = write_model(options.output, result, result_spec, params, inputs)
    log(f"{after:,} of {before:,} parameters ({after / before:.4f}); heads per block "
        f"{[b.heads for b in result_spec.blocks]}, MLP widths {[b.mlp_hidden for b in result_spec.blocks]}", level=1)
    if merging:
        log(f"token merging ({merging.method}): tokens after each block {tokens}", level=1)
    return Result(str(path), {"output": str(path), "kind": "model", "params_before": before, "params_after": after,
                              "params_fraction": after / before, "blocks": [b.to_dict() for b in result_spec.blocks],
                              "token_merging": merging.to_dict() if merging else None, "tokens_per_block": tokens})
