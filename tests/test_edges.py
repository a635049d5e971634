"""Bad input refused at the edge (issue 16, part A).

NaN and infinity in any float option, dataset pixels, model outputs and training losses;
an ``-o`` that names an input or a directory; click's own usage errors as one line; a
recipe key given twice. Every refusal is one line on stderr with the documented code and
leaves no output behind.
"""

from __future__ import annotations

import hashlib
import os
import stat

import click
import numpy as np
import pytest

from tapvits_cli.errors import ExitCode
from tests.conftest import TINY_VIT, TINY_VIT_KWARGS, model_args

NON_FINITE = ("nan", "inf", "-inf")


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("tapvits: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _float_options():
    """(subcommand, option) for every float option of every subcommand."""
    from tapvits_cli.cli.main import cli

    for name, command in sorted(cli.commands.items()):
        for param in command.params:
            if isinstance(param, click.Option) and isinstance(param.type, click.types.FloatParamType):
                yield name, param


FLOAT_OPTIONS = [(name, max(param.opts, key=len)) for name, param in _float_options()]


def test_float_options_are_found():
    # the parametrised test below must not pass vacuously
    assert ("allocate", "--budget") in FLOAT_OPTIONS and ("eval", "--min-top1") in FLOAT_OPTIONS
    assert ("finetune", "--lr") in FLOAT_OPTIONS and ("fit-gmm", "--dp-epsilon") in FLOAT_OPTIONS


@pytest.mark.parametrize("command,option", FLOAT_OPTIONS)
def test_every_float_option_refuses_nan_and_infinity(command, option, tapvits):
    from tapvits_cli.cli.options import FiniteFloat
    from tapvits_cli.cli.main import cli

    param = next(p for p in cli.commands[command].params if option in p.opts)
    assert isinstance(param.type, FiniteFloat), f"{command} {option} is a float option without FiniteFloat"
    for value in NON_FINITE:
        # the option comes first, so it is checked before any missing argument
        result = tapvits(command, f"{option}={value}")
        assert result.exit_code == ExitCode.USAGE, (value, result.stderr)
        line = _one_error_line(result.stderr)
        assert option in line and "finite" in line


def test_finite_float_keeps_ranges_and_help():
    from tapvits_cli.cli.options import FiniteFloat

    assert FiniteFloat().convert("1e-3", None, None) == 1e-3
    assert FiniteFloat(0, 1, min_open=True).convert("1", None, None) == 1.0
    for bad in ("0", "1.5", "nan", "inf", "x"):
        with pytest.raises(click.BadParameter):
            FiniteFloat(0, 1, min_open=True).convert(bad, None, None)
    assert FiniteFloat().name == "float" and FiniteFloat(0, 1).name == "float range"


def test_recipe_stage_options_refuse_nan():
    from tapvits_cli.cli.run import check_stage
    from tapvits_cli.errors import UsageError

    assert check_stage("allocate", {"min-keep": 0.2}, "stages.allocate") == {"min-keep": "0.2"}
    for value in (float("nan"), float("inf")):
        with pytest.raises(UsageError, match="stages.allocate.min-keep"):
            check_stage("allocate", {"min-keep": value}, "stages.allocate")
        with pytest.raises(UsageError, match="stages.finetune.lr"):
            check_stage("finetune", {"lr": value}, "stages.finetune")


@pytest.mark.parametrize("weights", ["nan,0,0", "0.8,inf,0.1", "0.8,0.1,-inf"])
def test_score_weights_refuse_non_finite(weights, tapvits, tmp_path):
    model, metric = tmp_path / "m.safetensors", tmp_path / "metric.h5"
    model.write_bytes(b"m")
    metric.write_bytes(b"s")   # parsed before any file is read
    result = tapvits("score", model, "--metric-set", metric, "--mlp-weights", weights, "-o", tmp_path / "s")
    assert result.exit_code == ExitCode.USAGE
    assert "--mlp-weights" in _one_error_line(result.stderr)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("value", [".nan", ".inf", "[1, -.inf]"])
def test_model_arguments_refuse_non_finite(value, tapvits, tmp_path):
    result = tapvits("create-model", TINY_VIT, "-a", f"mlp_ratio={value}", "-o", tmp_path / "m.safetensors")
    assert result.exit_code == ExitCode.USAGE
    assert "NaN and infinity" in _one_error_line(result.stderr)
    assert not (tmp_path / "m.safetensors").exists()


# --- non-finite pixels, outputs and losses --------------------------------------------------


def _npz(path, poison: bool, dtype=np.float32):
    rng = np.random.default_rng(0)
    images = rng.random((64, 8, 8)).astype(dtype)
    if poison:
        images[37, 3, 4] = np.nan
    np.savez(path, x=images, y=np.arange(64) % 10)
    return path


@pytest.mark.parametrize("value", [np.nan, np.inf, 1e300])
def test_dataset_refuses_non_finite_pixels(value, tapvits, tmp_path):
    data = _npz(tmp_path / "d.npz", poison=False, dtype=np.float64)
    with np.load(data) as z:
        images, labels = z["x"].copy(), z["y"]
    images[37, 3, 4] = value   # 1e300 overflows float32: infinite as the models see it
    np.savez(data, x=images, y=labels)
    result = tapvits("dataset", data)
    assert result.exit_code == ExitCode.USAGE
    line = _one_error_line(result.stderr)
    assert "image 37" in line and "NaN or infinite" in line


def test_finetune_refuses_nan_pixels_and_writes_no_model(tiny_model_file, tapvits, tmp_path):
    data = _npz(tmp_path / "d.npz", poison=True)
    out = tmp_path / "out.safetensors"
    result = tapvits("finetune", tiny_model_file, "--data", data, "--max-steps", "2", "--batch-size", "16", "-o", out)
    assert result.exit_code == ExitCode.USAGE
    assert "NaN or infinite" in _one_error_line(result.stderr)
    assert not out.exists() and not (tmp_path / "out.safetensors.ckpt").exists()


@pytest.fixture
def overflowing_model(tiny_model_file, tmp_path):
    """A valid artifact with finite weights whose logits overflow to ±infinity (so its loss is NaN)."""
    import torch

    from tapvits_cli.artifacts.model import load_model, write_model

    loaded = load_model(tiny_model_file)
    model, spec = loaded.module, loaded.spec
    with torch.no_grad():
        model.head.weight.fill_(3e38)
        model.head.weight[::2].fill_(-3e38)
    path = tmp_path / "overflow.safetensors"
    write_model(path, model, spec, {}, {})
    return path


def test_evaluate_counts_non_finite_outputs(overflowing_model, tiny_model_file):
    from tapvits_cli.artifacts.model import load_model
    from tapvits_cli.data import open_dataset
    from tapvits_cli.data.preprocess import Preprocessing
    from tapvits_cli.evaluation import evaluate

    dataset = open_dataset("digits:split=test:indices=0-49")
    for path, finite in ((tiny_model_file, True), (overflowing_model, False)):
        loaded = load_model(path)
        model, spec = loaded.module, loaded.spec
        accuracy = evaluate(model, dataset, Preprocessing.from_dict(spec.preprocessing), 16, "cpu")
        assert accuracy.finite is finite
        assert accuracy.nonfinite == (0 if finite else 50)


def test_eval_refuses_non_finite_outputs_and_writes_no_report(overflowing_model, tapvits, tmp_path):
    report = tmp_path / "report.json"
    result = tapvits("eval", overflowing_model, "--data", "digits:split=test:indices=0-49", "--no-latency", "-o", report)
    assert result.exit_code == ExitCode.INVALID_ARTIFACT
    assert "not finite" in _one_error_line(result.stderr)
    assert not report.exists()


def test_finetune_refuses_a_model_with_non_finite_outputs(overflowing_model, tapvits, tmp_path):
    out = tmp_path / "out.safetensors"
    result = tapvits("finetune", overflowing_model, "--data", "digits:split=test:indices=0-63", "--max-steps", "3",
                     "--batch-size", "16", "-o", out)
    assert result.exit_code == ExitCode.INVALID_ARTIFACT
    assert "first step" in _one_error_line(result.stderr)
    assert not out.exists()


def test_finetune_stops_when_training_diverges(tiny_model_file, tapvits, tmp_path):
    out = tmp_path / "out.safetensors"
    result = tapvits("finetune", tiny_model_file, "--data", "digits:split=test:indices=0-127", "--lr", "1e20",
                     "--min-lr", "0", "--warmup-fraction", "0", "--max-steps", "8", "--batch-size", "16", "--log-every", "1",
                     "-o", out)
    assert result.exit_code == ExitCode.USAGE, result.stderr
    assert "training diverged" in _one_error_line(result.stderr)
    assert not out.exists() and not (tmp_path / "out.safetensors.ckpt").exists()


def test_require_finite_tells_a_bad_model_from_divergence():
    from tapvits_cli.errors import InvalidArtifactError, UsageError
    from tapvits_cli.training.loop import _require_finite

    _require_finite(2.3, 1, 0)
    with pytest.raises(InvalidArtifactError):
        _require_finite(float("nan"), 1, 0)
    with pytest.raises(UsageError, match="step 7 \\(epoch 2\\)"):
        _require_finite(float("inf"), 7, 1)


# --- -o that names an input or a directory ------------------------------------------------


INPUT_FILES = {"model": "model.safetensors", "plan": "plan.safetensors", "scores": "scores.safetensors",
               "metric": "metric.h5", "gmm": "gmm.safetensors", "pool": "pool.h5", "data": "data.npz",
               "teacher": "teacher.safetensors", "weights": "weights.pt", "extractor": "extractor.safetensors"}


def _inputs(tmp_path) -> dict[str, str]:
    """Placeholder input files: the output check runs before any input is read."""
    files = {}
    for key, name in INPUT_FILES.items():
        path = tmp_path / name
        path.write_bytes(name.encode())
        files[key] = str(path)
    return files


# (command line with {placeholders}, the input that -o repeats)
WRITERS = [
    ("eval {model} --data digits -o {OUT}", "model"),
    ("eval {model} --data {data}:split=all -o {OUT}", "data"),
    ("prune {model} {plan} -o {OUT}", "model"),
    ("prune {model} {plan} -o {OUT}", "plan"),
    ("features --data {data} -e {extractor} -o {OUT}", "data"),
    ("features --data digits -e {extractor} -o {OUT}", "extractor"),
    ("fit-gmm --data {data} -e {extractor} -o {OUT}", "data"),
    ("select {gmm} --pool {pool} -o {OUT}", "gmm"),
    ("select {gmm} --pool {pool} -o {OUT}", "pool"),
    ("score {model} --metric-set {metric} -o {OUT}", "metric"),
    ("score {model} --metric-set {metric} -o {OUT}", "model"),
    ("allocate {scores} --budget 0.7 -o {OUT}", "scores"),
    ("allocate {scores} --budget 0.7 --model {model} -o {OUT}", "model"),
    ("finetune {model} --data digits -o {OUT}", "model"),
    ("finetune {model} --data digits --teacher {teacher} -o {OUT}", "teacher"),
    ("finetune {model} --data digits --finetune-set {metric} -o {OUT}", "metric"),
    ("export {model} -o {OUT}", "model"),
    ("create-model " + TINY_VIT + " --weights {weights} -o {OUT}", "weights"),
]


def _argv(template: str, files: dict[str, str], out: str) -> list[str]:
    return [part.format(OUT=out, **files) for part in template.split()]


@pytest.mark.parametrize("template,repeated", WRITERS)
def test_output_that_names_an_input_is_refused(template, repeated, tapvits, tmp_path):
    files = _inputs(tmp_path)
    before = {name: _sha256(path) for name, path in files.items()}
    result = tapvits(*_argv(template, files, files[repeated]))
    assert result.exit_code == ExitCode.USAGE, result.stderr
    line = _one_error_line(result.stderr)
    assert "is the input" in line and INPUT_FILES[repeated] in line
    assert {name: _sha256(path) for name, path in files.items()} == before


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_output_linked_to_an_input_is_refused(link, tapvits, tmp_path):
    files = _inputs(tmp_path)
    alias = tmp_path / "alias.safetensors"
    (os.symlink if link == "symlink" else os.link)(files["model"], alias)
    result = tapvits("eval", files["model"], "--data", "digits", "-o", alias)
    assert result.exit_code == ExitCode.USAGE
    assert "is the input MODEL" in _one_error_line(result.stderr)
    assert open(files["model"], "rb").read() == b"model.safetensors"


@pytest.mark.parametrize("template", sorted({template for template, _ in WRITERS}))
@pytest.mark.parametrize("kind", ["existing", "trailing-slash"])
def test_output_that_names_a_directory_is_refused(template, kind, tapvits, tmp_path):
    files = _inputs(tmp_path)
    target = tmp_path / "outdir"
    if kind == "existing":
        target.mkdir()
        out = str(target)
    else:
        out = str(target) + "/"
    result = tapvits(*_argv(template, files, out))
    assert result.exit_code == ExitCode.USAGE, result.stderr
    assert "directory" in _one_error_line(result.stderr)
    assert (target.is_dir() and not any(target.iterdir())) if kind == "existing" else not target.exists()


@pytest.mark.parametrize("template", sorted({template for template, _ in WRITERS}))
def test_output_that_is_a_fifo_is_refused_not_replaced(template, tapvits, tmp_path):
    """The rename onto the path replaced a FIFO (or, as root, /dev/null) with a regular file, exit 0."""
    files = _inputs(tmp_path)
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    result = tapvits(*_argv(template, files, str(fifo)))
    assert result.exit_code == ExitCode.USAGE, result.stderr
    assert "is not a regular file" in _one_error_line(result.stderr)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_every_command_with_an_output_checks_it():
    from tapvits_cli.cli.main import cli
    from tapvits_cli.cli.options import WritingCommand

    writers = {name for name, command in cli.commands.items() if any(p.name == "output" for p in command.params)}
    assert {"eval", "prune", "features", "fit-gmm", "select", "score", "allocate", "finetune", "export",
            "create-model"} <= writers
    for name in writers:
        assert isinstance(cli.commands[name], WritingCommand), name


def test_a_new_output_next_to_its_inputs_is_fine(tiny_model_file, tapvits, tmp_path):
    out = tmp_path / "report.json"
    result = tapvits("eval", tiny_model_file, "--data", "digits:split=test:indices=0-9", "--no-latency", "-o", out)
    assert result.exit_code == ExitCode.OK, result.stderr
    assert out.is_file()
    # overwriting an earlier output (not an input) stays allowed
    assert tapvits("eval", tiny_model_file, "--data", "digits:split=test:indices=0-9", "--no-latency",
                   "-o", out).exit_code == ExitCode.OK


# --- click's own usage errors --------------------------------------------------------------


@pytest.mark.parametrize("argv,expected", [
    (["allocate"], "Missing argument 'SCORES'"),
    (["eval", "--nope"], "No such option '--nope'"),
    (["no-such-command"], "No such command 'no-such-command'"),
    (["allocate", "--strategy", "best"], "Invalid value for '--strategy'"),
    (["eval", "--batch-size", "zero"], "Invalid value for '--batch-size'"),
    (["eval", "--min-top1", "2"], "not in the range"),
    (["create-model", TINY_VIT], "Missing option '-o' / '--output'"),
    (["--seed", "x", "inspect"], "Invalid value for '--seed'"),
])
def test_click_usage_errors_are_one_line(argv, expected, tapvits):
    result = tapvits(*argv)
    assert result.exit_code == ExitCode.USAGE
    line = _one_error_line(result.stderr)
    assert expected in line and "--help'" in line
    assert result.stdout == ""


def test_bare_command_still_shows_the_help(tapvits):
    result = tapvits()
    assert result.exit_code == ExitCode.USAGE
    assert "Commands:" in result.stderr + result.stdout


# --- recipes: a key given twice ------------------------------------------------------------


RECIPE = """\
version: 1
name: dup
public: digits:split=train
base_model: {artifact: base.safetensors}
devices:
  - {name: d0, private: "digits:split=test:classes=0-3"}
budget: 0.7
stages:
  score: {criterion: composite}
"""


@pytest.mark.parametrize("addition,key,line,first", [
    ("budget: 0.5\n", "budget", 10, 7),
    ("stages:\n  eval: {latency-repeats: 5}\n", "stages", 10, 8),
    ("thresholds: {min-top1: 0.5, min-top1: 0.9}\n", "min-top1", 10, 10),
])
def test_recipe_key_given_twice_is_refused(addition, key, line, first, tapvits, tmp_path):
    recipe = tmp_path / "dup.yaml"
    recipe.write_text(RECIPE + addition)
    result = tapvits("run", recipe, "--dry-run")
    assert result.exit_code == ExitCode.USAGE
    message = _one_error_line(result.stderr)
    assert f"line {line}," in message and f"duplicate key '{key}'" in message and f"line {first}" in message


def test_recipe_without_duplicates_still_loads(tapvits, tmp_path):
    recipe = tmp_path / "ok.yaml"
    recipe.write_text(RECIPE)
    result = tapvits("run", recipe, "--dry-run")
    assert result.exit_code == ExitCode.OK, result.stderr


def test_strict_yaml_allows_merge_key_overrides():
    from tapvits_cli.pipeline.recipe import load_yaml

    assert load_yaml("base: &b {x: 1, y: 2}\nvariant:\n  <<: *b\n  x: 3\n")["variant"] == {"x": 3, "y": 2}
    with pytest.raises(Exception, match="duplicate key 'x'"):
        load_yaml("variant:\n  x: 1\n  x: 3\n")


@pytest.mark.parametrize("setting", ["budget=.nan", "stages.allocate.tolerance=.inf", "thresholds.min-top1=.nan",
                                     "stages.finetune.lr=.nan"])
def test_recipe_refuses_non_finite_values(setting, tapvits, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("  - {name: d0, private:", "  - {name: d0, test: \"digits:split=test\", private:"))
    assert tapvits("run", recipe, "--dry-run").exit_code == ExitCode.OK
    result = tapvits("run", recipe, "--dry-run", "--set", setting)
    assert result.exit_code == ExitCode.USAGE, result.stdout
    assert setting.split("=")[0].split(".")[-1] in _one_error_line(result.stderr)


def test_recipe_model_arguments_keep_nan_a_float():
    from tapvits_cli.models.arguments import parse_model_args
    from tapvits_cli.errors import UsageError
    from tapvits_cli.pipeline.steps import _yaml_scalar

    assert [_yaml_scalar(v) for v in (0.5, float("nan"), float("inf"), -float("inf"))] == ["0.5", ".nan", ".inf", "-.inf"]
    with pytest.raises(UsageError, match="NaN and infinity"):
        parse_model_args((f"mlp_ratio={_yaml_scalar(float('nan'))}",))


def test_features_refuses_an_extractor_that_gives_non_finite_features_and_leaves_no_file(tiny_model_file, tapvits,
                                                                                         tmp_path):
    """A verdict on the extractor, not an interruption: no partial table is kept to resume (found by the fuzz
    run: a model whose preprocessing mean is 1e20)."""
    import json
    import shutil

    from safetensors import safe_open
    from test_corpus import write_metadata

    work = tmp_path / "work"
    work.mkdir()
    model = work / "model.safetensors"
    shutil.copy(tiny_model_file, model)
    with safe_open(model, "np") as handle:
        preprocessing = json.loads(handle.metadata()["model.preprocessing"])
    preprocessing["mean"] = [1e20] + list(preprocessing["mean"][1:])
    write_metadata(model, {"model.preprocessing": json.dumps(preprocessing)})
    result = tapvits("features", "--data", "digits:split=test", "--extractor", model, "-o", work / "out.h5")
    assert result.exit_code == ExitCode.INVALID_ARTIFACT and "non-finite features" in result.stderr
    assert sorted(p.name for p in work.iterdir()) == ["model.safetensors"]
