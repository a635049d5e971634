"""Recipes and `tapvits run`: strict validation, skipping unchanged steps, resuming, thresholds."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from tapvits_cli.errors import ExitCode

from conftest import TINY_VIT, TINY_VIT_KWARGS

RECIPES = Path(__file__).parent.parent / "recipes"

# A whole pipeline in seconds: a 2-block ViT, two simulated digits devices.
TINY_RECIPE = {
    "version": 1,
    "name": "tiny",
    "device": "cpu",
    "public": "digits:split=train",
    "base_model": {"train": {"model": TINY_VIT, "args": {k: v for k, v in TINY_VIT_KWARGS.items() if k != "num_classes"},
                             "epochs": 2, "batch-size": 64, "lr": 0.003}},
    "devices": [
        {"name": "low", "private": "digits:split=test:classes=0-4:fold=0/2",
         "test": "digits:split=test:classes=0-4:fold=1/2"},
        {"name": "high", "private": "digits:split=test:classes=5-9:fold=0/2",
         "test": "digits:split=test:classes=5-9:fold=1/2"},
    ],
    "budget": 0.7,
    "stages": {
        "fit-gmm": {"covariance": "diag", "components": "2-3", "pca-dim": 8},
        "select": {"metric-size": 32, "finetune-size": 128},
        "score": {"hsic-batch": 16},
        "finetune": {"epochs": 1, "distill": True},
        "eval": {"no-latency": True},
    },
}


def write_recipe(directory: Path, document: dict, name: str = "recipe.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@pytest.mark.parametrize("recipe", sorted(RECIPES.rglob("*.yaml")), ids=lambda p: str(p.relative_to(RECIPES)))
def test_shipped_recipes_are_valid(tapvits, recipe):
    result = tapvits("run", recipe, "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("tapvits ")


BAD_RECIPES = [
    ({"budgt": 0.5}, "unknown key 'budgt' (did you mean 'budget'?)"),
    ({"stages": {"score": {"critrion": "magnitude"}}}, "'stages.score.critrion' is not an option of `tapvits score` "
                                                        "(did you mean 'criterion'?)"),
    ({"stages": {"score": {"criterion": "loudest"}}}, "'stages.score.criterion': 'loudest' is not one of"),
    ({"stages": {"select": {"metric-size": "many"}}}, "'stages.select.metric-size': 'many' is not a valid integer"),
    ({"stages": {"select": {"pool": "x.h5"}}}, "'stages.select.pool' is set by the run itself"),
    ({"stages": {"finetune": {"distill": "yes"}}}, "'stages.finetune.distill' must be true or false"),
    ({"stages": {"eval": {"no-latency": 1}}}, "'stages.eval.no-latency' is a flag"),
    ({"stages": {"score": False}}, "'stages.score' cannot be switched off"),
    ({"budget": "high"}, "'budget' must be int or float"),
    ({"budget": 1.5}, "'budget' must be a fraction"),
    ({"version": 2}, "version 2 is newer"),
    ({"thresholds": {"min-top-1": 0.5}}, "unknown key 'thresholds.min-top-1'"),
    ({"devices": [{"name": "a", "test": "digits:split=test"}]}, "needs exactly one of 'gmm'"),
    ({"devices": [{"name": "a", "private": "digits"}, {"name": "a", "private": "digits"}]}, "'a' is used twice"),
    ({"devices": [{"name": "a", "private": "digits"}, {"name": "A", "private": "digits"}]}, "'A' is used twice"),
    ({"devices": []}, "'devices' must be a non-empty list"),
    ({"base_model": {"train": {"model": TINY_VIT, "epoch": 3}}},
     "'base_model.train.epoch' is not an option of `tapvits finetune` (did you mean 'epochs'?)"),
    ({"base_model": {"artifact": "m.safetensors", "train": {"model": TINY_VIT}}}, "exactly one of 'artifact' and 'train'"),
    ({"seed": -5}, "'seed' must lie in 0..4294967295"),
    ({"devices": [{"name": "low\n", "private": "digits"}]}, "must be letters, digits"),   # "$" matched before "\n"
]


@pytest.mark.parametrize("change,message", BAD_RECIPES, ids=[m[:30] for _, m in BAD_RECIPES])
def test_bad_recipes_fail_naming_the_key(tmp_path, tapvits, change, message):
    recipe = write_recipe(tmp_path, {**TINY_RECIPE, **change})
    result = tapvits("run", recipe, "--dry-run")
    assert result.exit_code == ExitCode.USAGE, result.stderr
    assert message in result.stderr
    assert result.stdout == "" and result.stderr.strip().count("\n") == 0


def test_yaml_syntax_error_names_the_line(tmp_path, tapvits):
    path = tmp_path / "broken.yaml"
    path.write_text("version: 1\nstages:\n  score: {criterion: composite\n")
    result = tapvits("run", path, "--dry-run")
    assert result.exit_code == ExitCode.USAGE
    assert "not valid YAML" in result.stderr and "line" in result.stderr


BOMB = "[&a [1,1,1,1,1,1,1,1,1,1], " + ", ".join(
    f"&{b} [{', '.join([f'*{a}'] * 10)}]" for a, b in zip("abcdefgh", "bcdefghi")) + "]"   # 10⁹ values in 700 bytes


@pytest.mark.parametrize("text, message", [
    (f"version: 1\nname: bomb\nbase_model: {{train: {{model: m, args: {{depth: {BOMB}}}}}}}\n",
     "aliases expand to more than 1,000,000 values"),
    ("version: 1\nstages: " + "[" * 50000 + "]" * 50000 + "\n", "nested too deeply"),
    ("version: 1\nbudget: " + "9" * 400 + "\n", "does not fit 64 bits"),
    ("version: " + "9" * 5000 + "\n", "not valid YAML"),
], ids=["alias-bomb", "deep-nesting", "huge-integer", "5000-digit-integer"])
def test_hostile_yaml_is_a_quick_usage_error(text, message, tmp_path, tapvits):
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    result = tapvits("run", path, "--dry-run")
    assert result.exit_code == ExitCode.USAGE and message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1
    via_set = tapvits("run", write_recipe(tmp_path, TINY_RECIPE), "--dry-run", "--set", f"stages.select.metric-size={BOMB}")
    assert via_set.exit_code == ExitCode.USAGE and "aliases expand" in via_set.stderr


@pytest.mark.parametrize("setting, key", [
    ("stages.finetune.augment=bogus", "stages.finetune.augment"),
    ("stages.score.mlp-weights=a,b", "stages.score.mlp-weights"),
    ("stages.eval.latency-batches=x", "stages.eval.latency-batches"),
    ("stages.eval.latency-batches=1,٣٢", "stages.eval.latency-batches"),   # not digits to the syntax: never dropped
    ("stages.fit-gmm.components=abc", "stages.fit-gmm.components"),
    ("stages.fit-gmm.components=2-10000000000", "stages.fit-gmm.components"),
])
def test_the_dry_run_checks_stage_values_as_their_commands_do(setting, key, tmp_path, tapvits):
    """A review: these passed --dry-run and failed only at their step, after the earlier steps had run."""
    result = tapvits("run", write_recipe(tmp_path, TINY_RECIPE), "--dry-run", "--set", setting)
    assert result.exit_code == ExitCode.USAGE and f"recipe: '{key}'" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1


def test_an_extends_symlink_loop_is_a_usage_error(tmp_path, tapvits):
    (tmp_path / "a.yaml").symlink_to(tmp_path / "b.yaml")
    (tmp_path / "b.yaml").symlink_to(tmp_path / "a.yaml")
    recipe = write_recipe(tmp_path, {**TINY_RECIPE, "extends": "a.yaml"}, "variant.yaml")
    result = tapvits("run", recipe, "--dry-run")
    assert result.exit_code == ExitCode.USAGE and "cannot be read" in result.stderr, result.stderr


def test_variants_override_a_base_recipe(tmp_path, tapvits):
    write_recipe(tmp_path, TINY_RECIPE, "base.yaml")
    variant = write_recipe(tmp_path, {"extends": "base.yaml", "name": "magnitude",
                                      "stages": {"score": {"criterion": "magnitude"}}}, "variant.yaml")
    result = tapvits("--json", "run", variant, "--dry-run", "--set", "budget=0.5")
    assert result.exit_code == 0, result.stderr
    commands = {step["id"]: step["command"] for step in result.json()["steps"]}
    score = commands["devices/low/score"]
    assert "--criterion magnitude" in score and "--budget 0.5" in score
    assert "--hsic-batch 16" in score                      # kept from the base recipe
    assert commands["devices/low/select"].startswith("tapvits select runs/magnitude/devices/low/gmm.safetensors")
    cycle = write_recipe(tmp_path, {"extends": "cycle.yaml"}, "cycle.yaml")
    assert "cycle" in tapvits("run", cycle, "--dry-run").stderr


def test_old_recipe_keys_of_renamed_options_still_work_with_a_warning(tmp_path, tapvits):
    recipe = write_recipe(tmp_path, {**TINY_RECIPE, "stages": {
        **TINY_RECIPE["stages"], "finetune": {"epochs": 1, "distill": True, "warmup": 0.2, "temperature": 2},
        "eval": {"warmup": 1}}})
    result = tapvits("--json", "run", recipe, "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert ("recipe: 'stages.finetune.warmup' is deprecated and will be removed in the next version; "
            "use 'stages.finetune.warmup-fraction'") in result.stderr
    assert "'stages.eval.warmup' is deprecated" in result.stderr
    commands = {step["id"]: step["command"] for step in result.json()["steps"]}
    assert "--warmup-fraction 0.2 " in commands["devices/low/finetune"]
    assert "--distill-temperature 2.0 " in commands["devices/low/finetune"]
    assert "--warmup-runs 1 " in commands["devices/low/eval"]
    both = write_recipe(tmp_path, {**TINY_RECIPE, "stages": {"eval": {"warmup": 1, "warmup-runs": 2}}}, "both.yaml")
    refused = tapvits("run", both, "--dry-run")
    assert refused.exit_code == ExitCode.USAGE and "deprecated spelling of 'stages.eval.warmup-runs'" in refused.stderr


def test_a_variant_removes_a_base_key_with_null(tmp_path, tapvits):
    write_recipe(tmp_path, TINY_RECIPE, "base.yaml")
    variant = write_recipe(tmp_path, {"extends": "base.yaml", "name": "nodepth",
                                      "base_model": {"train": {"args": {"depth": None, "mlp_ratio": 3}}}},
                           "variant.yaml")
    result = tapvits("--json", "run", variant, "--dry-run")
    assert result.exit_code == 0, result.stderr
    base = {step["id"]: step["command"] for step in result.json()["steps"]}["base"]
    assert "depth=" not in base and "mlp_ratio=3" in base and "embed_dim=" in base


def _run(tapvits, recipe, run_dir, *extra):
    result = tapvits("--json", "run", recipe, "--run-dir", run_dir, *extra)
    return result, (result.json() if result.stdout.strip() else None)


def test_run_skips_unchanged_steps_and_resumes(tmp_path, tapvits, monkeypatch):
    recipe = write_recipe(tmp_path, TINY_RECIPE)
    first, summary = _run(tapvits, recipe, tmp_path / "run")
    assert first.exit_code == 0, first.stderr
    steps = summary["steps"]["total"]
    assert summary["steps"]["ran"] == steps == 2 + 2 * 7
    assert {row["device"] for row in summary["devices"]} == {"low", "high"}
    for row in summary["devices"]:
        assert 0.0 <= row["top1"] <= 1.0 and row["params_kept"] == pytest.approx(0.7, abs=0.01)
        assert row["finetune_precision"] > 0.5        # GMM selection finds the device's classes
        for part in ("metric", "finetune"):              # coverage figures beside precision
            assert 0.0 < row[f"{part}_coverage"] <= 1.0 and 0.0 <= row[f"{part}_worst_component_ratio"]
            assert 0.0 < row[f"{part}_class_recall"] <= 1.0 and 0.0 <= row[f"{part}_min_class_ratio"]
    for name in ("recipe.yaml", "commands.sh", "run.json", "summary.json"):
        assert (tmp_path / "run" / name).is_file()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["devices"] == summary["devices"]

    again, unchanged = _run(tapvits, recipe, tmp_path / "run")
    assert again.exit_code == 0 and unchanged["steps"]["skipped"] == steps
    assert [r["top1"] for r in unchanged["devices"]] == [r["top1"] for r in summary["devices"]]

    # A changed fine-tuning parameter reruns fine-tuning and evaluation only.
    changed, result = _run(tapvits, recipe, tmp_path / "run", "--set", "stages.finetune.lr=0.0002")
    assert changed.exit_code == 0
    assert result["steps"]["ran"] == 4 and result["steps"]["skipped"] == steps - 4
    for row in result["devices"]:
        assert row["stage_sources"]["finetune"] == "ran" and row["stage_sources"]["prune"] == "skipped"

    # A damaged output is made again, not trusted.
    (tmp_path / "run" / "devices" / "low" / "plan.safetensors").write_bytes(b"damaged")
    _, repaired = _run(tapvits, recipe, tmp_path / "run")
    assert repaired["devices"][0]["stage_sources"]["allocate"] == "ran"

    # Interrupted in the second device's fine-tuning; a rerun finishes the rest, same results.
    from tapvits_cli.cli import run as run_module

    original = run_module._invoke

    def interrupt(step, root):
        if step.id == "devices/high/finetune":
            raise KeyboardInterrupt
        original(step, root)

    fresh = tmp_path / "interrupted"
    monkeypatch.setattr(run_module, "_invoke", interrupt)
    stopped, _ = _run(tapvits, recipe, fresh)
    assert stopped.exit_code == ExitCode.INTERRUPTED
    monkeypatch.setattr(run_module, "_invoke", original)
    resumed, finished = _run(tapvits, recipe, fresh)
    assert resumed.exit_code == 0
    assert finished["steps"]["ran"] == 2 and finished["steps"]["skipped"] == steps - 2
    assert [r["top1"] for r in finished["devices"]] == [r["top1"] for r in summary["devices"]]


def test_threshold_failure_exits_6_after_writing_the_summary(tmp_path, tapvits, monkeypatch):
    recipe = write_recipe(tmp_path, {**TINY_RECIPE, "devices": TINY_RECIPE["devices"][:1],
                                     "thresholds": {"min-top1": 1.0}})
    cache = tmp_path / "cache"
    result, summary = _run(tapvits, recipe, tmp_path / "a", "--cache", cache)
    assert result.exit_code == ExitCode.BELOW_THRESHOLD
    assert summary["passed"] is False and "min-top1 1.0" in summary["failures"][0]
    assert summary["devices"][0]["passed"] is False
    assert "min-top1" in result.stderr.splitlines()[-1]
    # Another run directory with the same cache copies every step instead of running it...
    result, summary = _run(tapvits, recipe, tmp_path / "b", "--cache", cache, "--set", "thresholds.min-top1=0")
    assert result.exit_code == 0, result.stderr
    assert summary["steps"]["cache"] == summary["steps"]["total"] and summary["passed"]
    # ...except an entry that no longer matches its recorded hash: deleted, and its step runs again.
    entry = next(p.with_name(p.name.replace(".record.json", ".json")) for p in cache.glob("*.record.json")
                 if json.loads(p.read_text())["output"].endswith("report.json"))
    entry.write_bytes(entry.read_bytes().replace(b'"top1"', b'"top2"', 1))   # a damaged entry, still JSON
    result, summary = _run(tapvits, recipe, tmp_path / "c", "--cache", cache, "--set", "thresholds.min-top1=0")
    assert result.exit_code == 0, result.stderr
    assert summary["steps"]["ran"] == 1 and summary["steps"]["cache"] == summary["steps"]["total"] - 1
    assert json.loads(entry.read_text())["top1"] == summary["devices"][0]["top1"]   # the rerun re-cached it
    # Other code (an edited source, another torch) trusts none of it: every step runs again.
    from tapvits_cli.pipeline import runner

    monkeypatch.setattr(runner, "code_fingerprint", lambda: "0" * 64)
    result, summary = _run(tapvits, recipe, tmp_path / "d", "--cache", cache, "--set", "thresholds.min-top1=0")
    assert result.exit_code == 0, result.stderr
    assert summary["steps"]["cache"] == 0 and summary["steps"]["ran"] == summary["steps"]["total"]


def test_code_fingerprint_follows_the_sources_not_their_bytecode(tmp_path):
    from tapvits_cli.pipeline.runner import code_fingerprint

    fingerprint = code_fingerprint.__wrapped__   # uncached: the same directory is read again
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("y = 2\n")
    first = fingerprint(tmp_path / "pkg")
    (tmp_path / "pkg" / "__pycache__").mkdir()
    (tmp_path / "pkg" / "__pycache__" / "a.py").write_text("stale\n")
    (tmp_path / "pkg" / "notes.txt").write_text("not code\n")
    assert fingerprint(tmp_path / "pkg") == first
    (tmp_path / "pkg" / "sub" / "b.py").write_text("y = 3\n")
    assert fingerprint(tmp_path / "pkg") != first


def test_two_runs_cannot_share_a_run_directory(tmp_path, tapvits):
    from tapvits_cli.artifacts.run_directory import RunDirectory

    holder = RunDirectory(tmp_path / "run")
    try:
        result = tapvits("run", write_recipe(tmp_path, TINY_RECIPE), "--run-dir", tmp_path / "run")
        assert result.exit_code == ExitCode.USAGE and "another tapvits run" in result.stderr
    finally:
        holder.close()


def test_a_damaged_run_directory_is_one_line_with_its_exit_code(tmp_path, tapvits):
    from tapvits_cli.artifacts.files import atomic_write
    from tapvits_cli.artifacts.run_directory import LOCK_FILE, STATE_FILE
    from tapvits_cli.errors import UsageError

    recipe = write_recipe(tmp_path, TINY_RECIPE)
    run = tmp_path / "run"
    (run / LOCK_FILE).mkdir(parents=True)
    result = tapvits("run", recipe, "--run-dir", run)
    assert result.exit_code == ExitCode.INVALID_ARTIFACT and "lock is not a plain file" in result.stderr
    (run / LOCK_FILE).rmdir()
    for state in ({"version": "abc", "steps": {}}, {"version": 1, "steps": {"base": "x"}},
                  {"version": 1, "steps": {"base": {"output": "../../elsewhere.safetensors", "seconds": 1}}},
                  {"version": 1, "steps": {"base": {"output": "base/model.safetensors", "seconds": "abc"}}}):
        (run / STATE_FILE).write_text(json.dumps(state))
        result = tapvits("run", recipe, "--run-dir", run)
        assert result.exit_code == ExitCode.INVALID_ARTIFACT and result.stderr.count("\n") == 1, (state, result.stderr)
    (tmp_path / "folder").mkdir()
    with pytest.raises(UsageError, match="is a folder"):   # checked before writing, not at the final rename
        with atomic_write(tmp_path / "folder") as tmp:
            tmp.write_bytes(b"x")


def test_run_state_is_json_with_one_step_per_line_and_reads_back(tmp_path):
    from tapvits_cli.artifacts.run_directory import STATE_FILE, RunDirectory

    directory = RunDirectory(tmp_path / "run")
    (tmp_path / "run" / "out.bin").write_bytes(b"x")
    for step in ("devices/a \"quoted\"/select", "base", "devices/ü/eval"):
        directory.record(step, "out.bin", "key-" + step, 1.5, "ran")
    text = (tmp_path / "run" / STATE_FILE).read_text()
    assert json.loads(text) == directory.state and len(text.splitlines()) == 3 + 2
    directory.close()
    assert RunDirectory(tmp_path / "run").state == json.loads(text)


def test_score_probes_at_the_budget_unless_probes_are_skipped(tmp_path, tapvits):
    recipe = write_recipe(tmp_path, TINY_RECIPE)
    default = tapvits("--json", "run", recipe, "--dry-run").json()["steps"]
    assert "--budget 0.7" in next(s["command"] for s in default if s["id"] == "devices/low/score")
    skipped = tapvits("--json", "run", recipe, "--dry-run", "--set", "stages.score.no-layer-importance=true",
                      "--set", "stages.allocate.strategy=uniform").json()["steps"]
    score = next(s["command"] for s in skipped if s["id"] == "devices/low/score")
    assert "--no-layer-importance" in score and "--budget" not in score


def test_run_progress_estimates_the_rest_from_finished_steps_of_the_same_stage():
    from tapvits_cli.pipeline.progress import RunProgress
    from tapvits_cli.pipeline.runner import StepOutcome
    from tapvits_cli.pipeline.schedule import StepFailure
    from tapvits_cli.pipeline.steps import Input, Output, Step

    def step(step_id, stage, needs=()):
        return Step(step_id, stage, (*[Input(n) for n in needs], Output(step_id)), step_id)

    steps = [step("base", "finetune"), step("a/score", "score", ["base"]), step("a/finetune", "finetune", ["a/score"]),
             step("b/score", "score", ["base"]), step("b/finetune", "finetune", ["b/score"])]
    progress = RunProgress(steps, started=0.0)
    progress.on_event("start", steps[0], None, now=0.0)
    assert progress.time_left(5.0) is None                       # nothing to go by yet
    progress.begin_work("base", "train", 100, now=0.0)
    progress.advance("base", 25, "epoch 1/4 loss 1.2")
    assert progress.running["base"].time_left(10.0) == pytest.approx(30.0)   # 25 units in 10 s, 75 to go
    progress.on_event("done", steps[0], StepOutcome(steps[0], "ran", 40.0), now=40.0)
    progress.on_event("start", steps[1], None, now=40.0)
    progress.on_event("done", steps[1], StepOutcome(steps[1], "ran", 10.0), now=50.0)
    # a/finetune and b/finetune as long as base (40 s), b/score as a/score (10 s)
    assert progress.done == 2 and progress.time_left(50.0) == pytest.approx(90.0)
    progress.on_event("start", steps[2], None, now=50.0)
    assert progress.time_left(60.0) == pytest.approx(80.0)       # the running one has 30 s left
    progress.on_event("failed", steps[3], StepFailure("b/score: no", 2), now=61.0)
    assert progress.done == 4 and progress.time_left(61.0) == pytest.approx(29.0)   # b/finetune will not start


def test_run_shows_plain_progress_lines_on_a_pipe(tmp_path, tapvits, monkeypatch):
    from tapvits_cli.cli import output

    monkeypatch.setattr(output, "PLAIN_PROGRESS_SECONDS", 0.2)
    recipe = write_recipe(tmp_path, {**TINY_RECIPE, "devices": TINY_RECIPE["devices"][:1],
                                     "stages": {**TINY_RECIPE["stages"], "finetune": False}})
    result = tapvits("run", recipe, "--run-dir", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    assert any(line.startswith("[1/8] base: tapvits finetune --model") for line in lines)
    *ticks, closing = [line for line in lines if " steps done" in line]
    pattern = re.compile(r"^(\[\d/8\] [a-z/-]+ \d+:\d\d( \(.*\))?; )?\d of 8 steps done, \d+:\d\d elapsed"
                         r"(, ETA \d+:\d\d)?$")
    assert ticks and all(pattern.match(line) for line in ticks), ticks
    assert any(line.startswith("[1/8] base ") and "(train " in line for line in ticks)   # the step's own progress
    assert any(", ETA " in line for line in ticks)              # once a step has finished
    assert re.match(r"^8 of 8 steps done in \d+:\d\d$", closing)
    bars = tapvits("run", recipe, "--run-dir", tmp_path / "run", "--force", "--progress")   # bars forced on a pipe
    assert bars.exit_code == 0 and any(re.match(r"^steps ━+ 8/8 \d+:\d\d:\d\d$", line)   # their last state
                                       for line in bars.stderr.splitlines()), bars.stderr
    quiet = tapvits("run", recipe, "--run-dir", tmp_path / "run", "--force", "-q")
    assert quiet.exit_code == 0
    assert not any(" steps done" in line or line.startswith("[") for line in quiet.stderr.splitlines())


def test_a_recipe_that_is_a_fifo_is_named_as_such(tmp_path, tapvits):
    """It was reported as "no such file"; reading it would have waited for a writer."""
    os.mkfifo(tmp_path / "recipe.yaml")
    result = tapvits("run", tmp_path / "recipe.yaml", "--dry-run")
    assert result.exit_code == ExitCode.USAGE and "not a regular file" in result.stderr, result.stderr
