"""``allocate``: scores + a budget → a plan of the heads and MLP neurons each block keeps."""

from __future__ import annotations

from dataclasses import dataclass

from tapvits_cli.errors import IncompatibleArtifactError, UsageError
from tapvits_cli.stages.common import Written as Result, argument, artifact_lineage, made_for, option
from tapvits_cli.stages.feedback import log
from tapvits_cli.vocabulary import DEFAULT_ALLOCATION_STRATEGY, LAYER_IMPORTANCE_STRATEGIES, UNIT_KINDS


@dataclass(frozen=True, kw_only=True)
class Options:
    scores_path: str = argument()
    output: str = option("-o", recipe=False)
    budget: float | None = option("--budget", recipe=False)
    budget_macs: float | None = option("--budget-macs", recipe=False)
    strategy: str = option("--strategy", DEFAULT_ALLOCATION_STRATEGY)
    min_keep: float = option("--min-keep", 0.1)
    allow_branch_removal: bool = option("--allow-branch-removal", False)
    temperature: float = option("--temperature", 1.1)
    tolerance: float = option("--tolerance", 0.005)
    model_path: str | None = option("--model", recipe=False)
    seed: int = 0
    device: str = "auto"


def run(options: Options) -> Result:
    from tapvits_cli.allocation.strategies import allocate
    from tapvits_cli.artifacts.model import verify_model
    from tapvits_cli.artifacts.plan import write_plan
    from tapvits_cli.artifacts.scores import read_scores
    from tapvits_cli.models.factory import cost_model

    if (options.budget is None) == (options.budget_macs is None):
        raise UsageError("give exactly one of --budget (parameters) and --budget-macs")
    budget_kind, value = ("params", options.budget) if options.budget is not None else ("macs", options.budget_macs)
    scores = read_scores(options.scores_path)
    if options.strategy in LAYER_IMPORTANCE_STRATEGIES and scores.layer_importance is None:
        raise UsageError(f"{options.scores_path} has no layer importance (scored with --no-layer-importance): "
                         "use --strategy uniform or global, or score again with the KL probes")
    inputs = {"scores": artifact_lineage(options.scores_path, "scores")}
    if options.model_path:
        model = verify_model(options.model_path)   # every rule validate applies, weights included
        if not made_for(scores.model_sha256, scores.blocks, model):
            raise IncompatibleArtifactError(f"{options.scores_path} was computed on another model (weights "
                                            f"{scores.model_sha256[:12]}) than {options.model_path}: score this "
                                            "model first")
        inputs["model"] = artifact_lineage(options.model_path, "model")
    cost = cost_model(scores.model_spec)
    unit_scores = {key: values["score"] for key, values in scores.values.items()}
    result = allocate(cost, unit_scores, scores.layer_importance, budget_kind, value, options.strategy,
                      options.min_keep, options.allow_branch_removal, options.temperature, options.tolerance)
    _warn_on_another_budget(options, scores, value)

    keep = result.kept_units(cost)
    achieved = {"params": result.params, "params_fraction": result.params / result.base_params,
                "macs": result.macs, "macs_fraction": result.macs / result.base_macs}
    params = {"budget": value, "budget_kind": budget_kind, "strategy": options.strategy, "min_keep": options.min_keep,
              "allow_branch_removal": options.allow_branch_removal, "temperature": options.temperature,
              "tolerance": options.tolerance}
    path = write_plan(options.output, keep, options.strategy, {"kind": budget_kind, "value": value}, achieved,
                      {"params": result.base_params, "macs": result.base_macs}, scores.model,
                      inputs["scores"].sha256, params, inputs)
    log(f"{options.strategy}: {result.params:,} of {result.base_params:,} parameters "
        f"({achieved['params_fraction']:.4f}), {result.macs:,} of {result.base_macs:,} MACs "
        f"({achieved['macs_fraction']:.4f})", level=1)
    ratios = {kind: [round(len(kept) / widths.units(kind), 4) for kept, widths in zip(keep[kind], scores.blocks)]
              for kind in UNIT_KINDS}
    return Result(str(path), {"output": str(path), "kind": "plan", "strategy": options.strategy,
                              "budget": {"kind": budget_kind, "value": value}, "achieved": achieved,
                              "keep_ratios": ratios})


def _warn_on_another_budget(options: Options, scores, budget: float) -> None:
    """A warning when a KL strategy (kl, kl-power) plans for another budget than the scores' KL probes were made for.

    ``score --budget B`` probes each layer with the share 1 − B of its units removed, so
    that its layer importance measures the pruning the plan will do; a plan for another
    budget still works, but on importances measured for other cuts. A recipe gives both
    stages its one budget; by hand the two can differ, and this says so.
    """
    if options.strategy not in LAYER_IMPORTANCE_STRATEGIES or scores.probe_fraction is None:
        return
    probed = 1 - scores.probe_fraction
    if abs(probed - budget) > 1e-6:
        flag = "--budget" if options.budget is not None else "--budget-macs"
        log(f"warning: {options.scores_path} was probed for a budget of {probed:.4g} (score --budget "
            f"{probed:.4g}, i.e. --probe-fraction {scores.probe_fraction:.4g}), but this plan is for {flag} "
            f"{budget:.4g}: the kl layer importance was measured for another cut; score again with --budget "
            f"{budget:.4g} to match")
