"""``tapvits run RECIPE``: the whole pipeline from a YAML recipe, resumable and cached.

Every step calls its stage, ``stages.<stage>.run(options)``, with the options the
recipe gives; those options render the command line a user would type (``commands.sh``
in the run directory lists them), so a recipe and a shell pipeline cannot drift apart.
A stage section accepts the options its stage lets a recipe set (``Options`` fields not
marked ``recipe=False``), each checked with the subcommand's own option type.

Longer than the other subcommands because it also owns that check of a recipe against
the subcommands' options, the executor options and the summary table.
"""

from __future__ import annotations

import copy
import functools
import shlex
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import click

from tapvits_cli.cli import allocate, eval_cmd, features, finetune, fit_gmm, prune, score, select
from tapvits_cli.cli.options import CURRENT, Settings, deprecation_line, global_options, restore_settings
from tapvits_cli.cli.output import emit, log, progress_bar, stderr_console
from tapvits_cli.cli.stage_call import flag_names
from tapvits_cli.errors import BelowThresholdError, ParameterError, TapvitsError, UsageError
from tapvits_cli.vocabulary import EXECUTORS, MAX_PARALLEL

STAGE_COMMANDS: dict[str, click.Command] = {
    "fit-gmm": fit_gmm.command, "features": features.command, "select": select.command, "score": score.command,
    "allocate": allocate.command, "prune": prune.command, "finetune": finetune.command, "eval": eval_cmd.command,
}
RUN_ONLY_KEYS = {"finetune": {"distill"}}   # recipe keys that are not options of the subcommand


def _long_name(option: click.Option) -> str:
    return max((o for o in option.opts if o.startswith("--")), key=len, default=option.opts[0]).lstrip("-")


def _recipe_options(stage: str) -> dict[str, click.Option]:
    """The keys a recipe's section of ``stage`` may hold, each with the subcommand option it stands for."""
    from tapvits_cli.stages import stage_module
    from tapvits_cli.stages.common import recipe_keys

    command = STAGE_COMMANDS["finetune" if stage == "train" else stage]
    keys = recipe_keys(stage_module(command.name).Options)
    return {_long_name(p): p for p in command.params if isinstance(p, click.Option) and _long_name(p) in keys}


def check_stage(stage: str, options: Mapping[str, Any], path: str) -> dict:
    """Recipe stage options checked with the subcommand's own option types (values kept as option text)."""
    from tapvits_cli.pipeline.recipe import suggest

    allowed = _recipe_options(stage)
    extra = RUN_ONLY_KEYS.get(stage, set())
    name = "finetune" if stage == "train" else stage
    known = {o.lstrip("-") for p in STAGE_COMMANDS[name].params for o in (*p.opts, *p.secondary_opts)} | {"help"}
    checked: dict[str, Any] = {}
    for key, value in _renamed_keys(STAGE_COMMANDS[name], options, path).items():
        if key in extra:
            if not isinstance(value, bool):
                raise UsageError(f"recipe: '{path}.{key}' must be true or false")
            checked[key] = value
            continue
        if key not in allowed:
            reason = (" is set by the run itself" if key in known else
                      f" is not an option of `tapvits {name}`{suggest(key, list(allowed) + sorted(extra))}")
            raise UsageError(f"recipe: '{path}.{key}'{reason}")
        option = allowed[key]
        if option.is_flag:
            if not isinstance(value, bool):
                raise UsageError(f"recipe: '{path}.{key}' is a flag: true or false, not {value!r}")
            checked[key] = value
            continue
        if isinstance(value, (dict, bool)) or value is None:
            raise UsageError(f"recipe: '{path}.{key}' needs a value like the option --{key} takes, not {value!r}")
        values = value if option.multiple and isinstance(value, list) else [value]
        texts = [",".join(str(v) for v in item) if isinstance(item, list) else str(item) for item in values]
        for text in texts:
            try:   # the option's type, then its callback: what the command line would check, in the same order
                converted = option.type.convert(text, option, None)
                if option.callback is not None:
                    option.callback(click.Context(STAGE_COMMANDS[name]), option, converted)
            except click.BadParameter as exc:
                raise UsageError(f"recipe: '{path}.{key}': {exc.message}") from None
        checked[key] = texts if option.multiple else texts[0]
    return checked


def _renamed_keys(command: click.Command, options: Mapping[str, Any], path: str) -> dict[str, Any]:
    """A recipe section with the old spellings of renamed options (``RenamingCommand.renamed``)
    replaced by the new ones, each use logged as deprecated, as on the command line."""
    renamed = {old.lstrip("-"): new.lstrip("-") for old, new in getattr(command, "renamed", {}).items()}
    section: dict[str, Any] = {}
    for key, value in options.items():
        new = renamed.get(key)
        if new is None:
            section[key] = value
            continue
        if new in options:
            raise UsageError(f"recipe: '{path}.{key}' is the deprecated spelling of '{path}.{new}': give only '{new}'")
        log(deprecation_line("recipe", f"'{path}.{key}'", f"'{path}.{new}'"))
        section[new] = value
    return section


def stage_fields(stage: str, checked: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of ``stages.<stage>.Options`` from a checked recipe section: each value
    parsed as the subcommand parses its option (type and callback), so ``2-3`` becomes ``[2, 3]``."""
    options = _recipe_options(stage)
    context = click.Context(STAGE_COMMANDS["finetune" if stage == "train" else stage])
    fields = {}
    for key, value in checked.items():
        if key in options:   # run-only keys (finetune's distill) are the caller's
            option = options[key]
            fields[option.name] = option.process_value(context, value)
    return fields


def _invoke(step, root: str) -> None:
    """Run one step: its stage, called with its options, in this process.

    The run reports each step itself, so the stage's own log lines show only with ``-v``
    (its progress goes where the caller installed it); a stage's error names the step.
    """
    from tapvits_cli.stages import feedback, stage_module

    with feedback.installed(log=log if CURRENT.verbosity >= 1 else feedback.no_log):
        try:
            stage_module(step.stage).run(step.resolved(root))
        except ParameterError as exc:
            raise UsageError(f"{step.id}: {exc.naming(flag_names(STAGE_COMMANDS[step.stage]))}") from None
        except TapvitsError as exc:
            exc.args = (f"{step.id}: {exc}",)
            raise


def _invoke_in_worker(step, root: str, settings: Settings) -> None:
    """One step in a worker process (``--jobs``, Ray, Slurm) with the run's global settings.

    Module-level so that executors can pickle it. The worker calls the stage function as
    :func:`_invoke` does; the settings only decide what it reports (``-v``, progress).
    """
    from tapvits_cli.stages import feedback

    restore_settings(settings)
    with feedback.installed(progress=progress_bar if CURRENT.verbosity >= 1 else feedback.no_progress):
        _invoke(step, root)


def _command_line(step, root: str) -> str:
    return " ".join(shlex.quote(token) for token in ["tapvits", step.stage, *step.argv(root)])


@click.command("run", short_help="Run a YAML recipe: the whole pipeline, resumable.")
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@click.option("--run-dir", type=click.Path(file_okay=False), help="Where the artifacts go [default: runs/NAME].")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, repeatable: --set budget=0.5 --set stages.score.criterion=magnitude.")
@click.option("--cache", type=click.Path(file_okay=False),
              help="A stage cache shared between runs: a step whose key is there is copied, not rerun.")
@click.option("--force", is_flag=True, help="Rerun every step, even unchanged ones.")
@click.option("--dry-run", is_flag=True, help="Print the subcommands the recipe runs, and run nothing.")
@click.option("--jobs", "-j", type=click.IntRange(1, MAX_PARALLEL), metavar="N",
              help="Steps run side by side at most (devices in parallel); alone, runs N local worker processes.")
@click.option("--executor", type=click.Choice(EXECUTORS),
              help="Where steps run: here one at a time (serial), local processes, Ray tasks or Slurm jobs "
                   "[default: local with --jobs, else serial]. Ray and Slurm workers need the run directory, "
                   "datasets and cache on a file system they share with this machine, at the same paths.")
@click.option("--address", metavar="ADDR", help="The Ray cluster to use (auto, ray://HOST:10001) [default: a local one].")
@click.option("--cpus-per-step", type=click.IntRange(1, MAX_PARALLEL), metavar="N",
              help="CPU threads a step gets in a worker [default: cores/jobs locally, 1 on Ray and Slurm; "
                   "a serial run: OMP_NUM_THREADS].")
@click.option("--retries", type=click.IntRange(min=0), default=1, show_default=True, metavar="N",
              help="Attempts more for a step whose worker crashed or was killed (a refused input is not retried).")
@click.option("--slurm", "slurm_settings", multiple=True, metavar="KEY=VALUE",
              help="A Slurm job setting, repeatable: partition=NAME, time=MINUTES, any submitit parameter "
                   "(mem_gb=16); cluster=local rehearses on this machine. Overrides the recipe's slurm section.")
@global_options
def command(recipe_path: str, run_dir: str | None, settings: tuple[str, ...], cache: str | None, force: bool,
            dry_run: bool, jobs: int | None, executor: str | None, address: str | None, cpus_per_step: int | None,
            retries: int, slurm_settings: tuple[str, ...]) -> None:
    """Carry out RECIPE: base model, pool features, and per device fit-gmm → select →
    score → allocate → prune → finetune → eval.

    Artifacts go to the run directory with the resolved recipe (recipe.yaml), the
    subcommands (commands.sh), the step records (run.json) and the summary
    (summary.json). A step whose subcommand, options, input artifacts and datasets are
    unchanged is skipped, so a rerun after an interruption or an edit redoes only what
    changed. Prints the run directory (the summary with --json); a table goes to stderr.
    Exits with code 6 when a threshold of the recipe fails (the summary is written first).
    While it runs, a terminal shows a bar for the whole run (steps done, ETA) and one for
    each running step; elsewhere a plain line every 30 s says the same (-q: nothing).

    Devices run side by side with --jobs N (local processes) or on Ray or Slurm
    (--executor); shared steps run once, first. A device whose step fails does not stop
    the others: the run writes the summary of the others, exits with the failed step's
    code naming the failed devices, and running it again does only what is left.

    Example: tapvits run recipes/quickstart.yaml --set budget=0.5 --run-dir runs/half
    """
    from tapvits_cli.artifacts.run_directory import RunDirectory
    from tapvits_cli.pipeline.recipe import apply_setting, parse_recipe, parse_yaml_value, read_recipe_document, to_document
    from tapvits_cli.pipeline.inbox import take_inboxes
    from tapvits_cli.pipeline.schedule import check_executor_options
    from tapvits_cli.pipeline.steps import build_steps

    document = read_recipe_document(recipe_path)
    for setting in settings:
        document = apply_setting(document, setting, parse_yaml_value)
    recipe, skipped_uploads = take_inboxes(parse_recipe(document, Path(recipe_path).stem, check_stage))
    for upload in skipped_uploads:
        log(f"inbox: skipped {upload.file}: {upload.reason}")
    steps = build_steps(recipe, stage_fields)
    root = run_dir or f"runs/{recipe.name}"
    if dry_run:
        emit({"steps": [{"id": s.id, "command": _command_line(s, root)} for s in steps]},
             "\n".join(_command_line(s, root) for s in steps))
        return
    _check_external_inputs(steps)
    chosen = executor or ("local" if jobs and jobs > 1 else "serial")
    check_executor_options(chosen, jobs, address, slurm_settings)
    # the recipe's slurm section, then the flags: a flag overrides the recipe's value of its key
    where = Where(chosen, jobs, cpus_per_step, address,
                  recipe.slurm + slurm_settings if chosen == "slurm" else slurm_settings, retries)
    check_executor_options(chosen, jobs, address, where.slurm)
    directory = RunDirectory(root, cache)
    try:
        directory.write_recipe(to_document(recipe))
        directory.write_commands([_command_line(s, root) for s in steps])
        summary, failed = _execute(recipe, steps, directory, root, force, where)
        summary["skipped_uploads"] = [{"file": upload.file, "reason": upload.reason} for upload in skipped_uploads]
        directory.write_summary(summary)
    finally:
        directory.close()
    _show(summary)
    emit(summary, root)
    if failed is not None:
        raise failed
    if summary["failures"]:
        raise BelowThresholdError("; ".join(summary["failures"]))


def _check_external_inputs(steps) -> None:
    for step in steps:
        for token in step.inputs:
            if token.external and not Path(token.path).is_file():
                raise UsageError(f"recipe: {step.id} needs {token.path}, which does not exist")


class Where(NamedTuple):
    """Where and how the steps run (the executor options of ``tapvits run``)."""

    executor: str
    jobs: int | None
    cpus_per_step: int | None
    address: str | None
    slurm: tuple[str, ...]
    retries: int


def _execute(recipe, steps, directory, root: str, force: bool, where: Where) -> tuple[dict, TapvitsError | None]:
    """The run's summary, and the error to exit with when steps failed (after the summary is written).

    A failed shared step leaves no device to summarise, so its error is raised at once.
    """
    from tapvits_cli.cli.run_progress import RunDisplay
    from tapvits_cli.data import open_dataset
    from tapvits_cli.pipeline.schedule import StepsFailedError, available_cpus, execute, make_executor
    from tapvits_cli.stages import feedback

    fingerprints: dict[str, str] = {}

    def fingerprint(reference: str) -> str:
        if reference not in fingerprints:
            fingerprints[reference] = open_dataset(reference).fingerprint()
        return fingerprints[reference]

    total = len(steps)
    position = {step.id: index for index, step in enumerate(steps, start=1)}
    display = RunDisplay(steps, parallel=1 if where.executor == "serial" else
                         min(where.jobs or available_cpus(), max(1, len(recipe.devices))))

    # A device's summary row is read as soon as its last step finishes, while other devices still run:
    # otherwise a parallel run would read every device's artifacts after its last step, on one core.
    devices = {device.name: device for device in recipe.devices}
    unfinished = {name: {step.id for step in steps if step.device == name} for name in devices}
    evaluated = {step.device for step in steps if step.stage == "eval"}
    readings: dict[str, dict] = {}

    def on_event(event: str, step, detail) -> None:
        display.on_event(event, step, detail)
        if event == "done" and step.device in unfinished:
            unfinished[step.device].discard(step.id)
            if not unfinished[step.device]:
                try:
                    readings[step.device] = _device_reading(devices[step.device], directory,
                                                            evaluated=step.device in evaluated)
                except (TapvitsError, OSError):
                    pass   # read again for the summary, which reports it as a serial run would
        if event == "start":
            log(f"[{position[step.id]}/{total}] {step.id}: {_command_line(step, root)}")
        elif event == "retry":
            log(f"[{position[step.id]}/{total}] {detail.message}; trying again")
        elif event == "failed":
            log(f"[{position[step.id]}/{total}] failed: {detail.message}")
        elif detail.source != "ran":
            log(f"[{position[step.id]}/{total}] {step.id}: unchanged, "
                f"{'reused from the cache' if detail.source == 'cache' else 'skipped'}", level=1)

    def in_this_process(step) -> None:
        with feedback.installed(progress=display.step_progress(step)):
            _invoke(step, root)

    executor = make_executor(where.executor, functools.partial(_invoke_in_worker, root=root, settings=copy.copy(CURRENT)),
                             in_this_process, where.jobs, where.cpus_per_step, where.address,
                             where.slurm, str(directory.path("slurm")), gpus=recipe.device != "cpu")
    with display:
        schedule = execute(steps, directory, executor, fingerprint, force, where.retries, on_event)
    if not schedule.failures:
        return _summary(recipe, schedule.outcomes, directory, set(), readings), None
    error = StepsFailedError(steps, schedule.failures)
    if not error.failed_devices or any(not step.device for step in steps if step.id in schedule.failures):
        raise error
    return _summary(recipe, schedule.outcomes, directory, set(error.failed_devices), readings), error


def _device_reading(device, directory, evaluated: bool) -> dict:
    """What a device's summary row reads from its finished artifacts (and its private split's labels)."""
    from tapvits_cli.artifacts.metric_set import read_metric_set
    from tapvits_cli.artifacts.report import read_report
    from tapvits_cli.data import open_dataset

    where = f"devices/{device.name}"
    metric_set = read_metric_set(directory.path(f"{where}/metric.h5"))
    return {"report": read_report(directory.path(f"{where}/report.json")) if evaluated else None,
            "selected_labels": metric_set.labels, "metric_size": metric_set.metric_size,
            "private_labels": open_dataset(device.private).labels if device.private else None,
            "coverage": metric_set.coverage}


def _summary(recipe, outcomes, directory, failed_devices: set[str], readings: Mapping[str, dict]) -> dict:
    """The run's summary; ``readings`` holds the devices already read as they finished."""
    from tapvits_cli.artifacts.model import read_model_spec
    from tapvits_cli.pipeline.summary import DeviceResult, summarize

    by_id = {outcome.step.id: outcome for outcome in outcomes}
    base_path = recipe.base_model.artifact or str(directory.path("base/model.safetensors"))
    base_parameters = int(read_model_spec(base_path).artifact.metadata["model.parameters"])
    results = []
    for device in recipe.devices:
        if device.name in failed_devices:
            continue
        own = [o for o in outcomes if o.step.device == device.name]
        reading = readings.get(device.name) or _device_reading(device, directory,
                                                               evaluated=f"devices/{device.name}/eval" in by_id)
        results.append(DeviceResult(name=device.name, **reading,
                                    stage_seconds={o.step.stage: o.seconds for o in own},
                                    stage_sources={o.step.stage: o.source for o in own}))
    shared = {o.step.id: o.seconds for o in outcomes if o.step.device is None}
    summary = summarize(recipe.name, recipe.budget, results, base_parameters, recipe.thresholds, shared)
    summary["steps"] = {"total": len(outcomes), **{source: sum(o.source == source for o in outcomes)
                                                  for source in ("ran", "skipped", "cache")}}
    summary["failed_devices"] = sorted(failed_devices)
    return summary


def _show(summary: dict) -> None:
    if CURRENT.verbosity < 0:
        return
    from rich.table import Table
    from rich.text import Text

    from tapvits_cli.reporting.terminal import printable

    table = Table(title=f"run {summary['recipe']}: budget {summary['budget']:.0%} of "
                        f"{summary['base_parameters']:,} parameters", title_justify="left")
    for column in ("device", "top-1", "params kept", "MACs (M)", "ms @1", "ms @32", "precision", "coverage",
                   "class recall", "time (s)"):
        table.add_column(column, justify="left" if column == "device" else "right")

    def number(row, key, fmt):
        return format(row[key], fmt) if row.get(key) is not None else "–"

    for row in summary["devices"]:
        macs = f"{row['macs'] / 1e6:.2f}" if "macs" in row else "–"
        table.add_row(row["device"], number(row, "top1", ".2%"), number(row, "params_kept", ".1%"), macs,
                      number(row, "latency_ms_at_1", ".2f"), number(row, "latency_ms_at_32", ".1f"),
                      number(row, "finetune_precision", ".1%"), number(row, "finetune_coverage", ".2f"),
                      number(row, "finetune_class_recall", ".0%"), f"{sum(row['stage_seconds'].values()):.1f}")
    if summary["mean"]:
        table.add_row("mean (by samples)", f"{summary['mean']['top1']:.2%}", f"{summary['mean']['params_kept']:.1%}",
                      "", "", "", "", "", "", "", style="bold")
    console = stderr_console()
    console.width = max(console.width, 120)   # the table stays readable in CI logs and pipes
    console.print(table)
    steps = summary["steps"]
    console.print(f"steps: {steps['ran']} ran, {steps['skipped']} unchanged, {steps['cache']} from the cache")
    for failure in summary["failures"]:
        console.print(Text.assemble(("threshold failed", "red"), f": {printable(failure, one_line=True)}"))
