"""Machine-friendly output: pipes get whole lines (no wrapping, truncation or trailing
spaces), files follow the umask, and --json turns errors into one JSON object on stderr."""

from __future__ import annotations

import json
import os
import re

from tapvits_cli.errors import ExitCode

from conftest import TINY_VIT, TINY_VIT_KWARGS, model_args


def test_piped_inspect_keeps_hashes_whole_and_lines_unpadded(tiny_model_file, tapvits):
    result = tapvits("inspect", tiny_model_file)   # capsys: stdout is not a terminal
    assert result.exit_code == 0, result.stderr
    digest = tapvits("--json", "inspect", tiny_model_file).json()["figures"]["weights_sha256"]
    assert digest in result.stdout and "…" not in result.stdout
    assert all(line == line.rstrip() for line in result.stdout.splitlines())


def test_piped_log_lines_are_never_wrapped(capsys):
    from tapvits_cli.cli.output import log

    command = "tapvits score " + " ".join(f"--option-{i} 'value {i}'" for i in range(40))
    log(command)
    err = capsys.readouterr().err
    assert err == command + "\n"


def test_tables_on_a_pipe_have_no_trailing_spaces(capsys):
    from rich.table import Table

    from tapvits_cli.cli.output import stderr_console

    table = Table("name", "value")
    table.add_row("a" * 150, "x")
    table.add_row("b", "y" * 3)
    stderr_console().print(table)
    lines = capsys.readouterr().err.splitlines()
    assert any("a" * 150 in line for line in lines)   # not truncated to 80 columns
    assert lines and all(line == line.rstrip() for line in lines)


def test_artifacts_follow_the_umask(tmp_path, tapvits):
    previous = os.umask(0o027)
    try:
        path = tmp_path / "m.safetensors"
        assert tapvits("create-model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "-o", path).exit_code == 0
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o640


def test_json_errors_are_one_object_on_stderr(tmp_path, tapvits):
    missing = tapvits("--json", "inspect", tmp_path / "missing")
    assert missing.exit_code == ExitCode.USAGE and missing.stdout == ""
    document = json.loads(missing.stderr)
    assert document["exit_code"] == ExitCode.USAGE and document["kind"] == "usage"
    assert "does not exist" in document["error"]

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not an artifact at all")
    invalid = tapvits("inspect", bad, "--json")
    lines = invalid.stderr.splitlines()
    assert invalid.exit_code == ExitCode.INVALID_ARTIFACT and len(lines) == 1
    assert json.loads(lines[0]) == {"error": json.loads(lines[0])["error"], "exit_code": 3,
                                    "kind": "invalid-artifact"}

    # click fails on an unknown option before --json is processed: still JSON
    unknown = tapvits("inspect", "--json", "--bogus", bad)
    assert json.loads(unknown.stderr)["kind"] == "usage"
    # and without --json errors stay one plain line
    plain = tapvits("inspect", bad)
    assert re.fullmatch(r"tapvits: error: .*\n", plain.stderr)


def test_every_json_error_kind_is_in_the_readme_table():
    from pathlib import Path

    from tapvits_cli.cli.main import EXIT_KINDS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for code, kind in EXIT_KINDS.items():
        assert f"| {int(code)} | `{kind}` |" in readme


def test_a_pipe_gets_plain_periodic_progress_lines(capsys):
    from tapvits_cli.cli.output import plain_progress

    with plain_progress("finetune", 4, interval=0.0) as advance:
        for step in range(4):
            advance(1, f"epoch 1/1 loss {1.0 / (step + 1):.4f}")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 5
    assert lines[0].startswith("finetune 1/4 (25%), ") and "/s, " in lines[0] and "ETA" in lines[0]
    assert lines[0].endswith("epoch 1/1 loss 1.0000")
    assert lines[-1].startswith("finetune 4/4 (100%) done in ") and lines[-1].endswith("loss 0.2500")


def test_short_work_on_a_pipe_prints_no_progress(capsys):
    from tapvits_cli.cli.output import plain_progress

    with plain_progress("eval", 3, interval=3600.0) as advance:
        advance(3)
    assert capsys.readouterr().err == ""


def test_finetune_on_a_pipe_reports_progress_unless_quiet(tiny_model_file, tmp_path, tapvits, monkeypatch):
    from tapvits_cli.cli import output

    monkeypatch.setattr(output, "PLAIN_PROGRESS_SECONDS", 0.0)
    args = ["finetune", tiny_model_file, "--data", "digits:split=train:sample=128", "--epochs", "1",
            "--batch-size", "64", "--log-every", "1", "--no-checkpoint"]
    loud = tapvits(*args, "-o", tmp_path / "a.safetensors")
    assert loud.exit_code == 0, loud.stderr
    progress = [line for line in loud.stderr.splitlines() if line.startswith("finetune ")]
    assert progress[0].startswith("finetune 1/2 (50%)") and "loss" in progress[0]
    assert progress[-1].startswith("finetune 2/2 (100%) done in")
    quiet = tapvits(*args, "-q", "-o", tmp_path / "b.safetensors")
    assert quiet.exit_code == 0 and quiet.stderr == ""
    off = tapvits(*args, "--no-progress", "-o", tmp_path / "c.safetensors")
    assert off.exit_code == 0 and not any(line.startswith("finetune ") for line in off.stderr.splitlines())


def test_log_lines_are_plain_text_not_markup(capsys):
    from tapvits_cli.cli.output import log

    line = "[3/16] devices/low/score: tapvits score 'runs/[/data]/m.safetensors' -a depths=[2,2,6] [bold]x[/bold]"
    log(line)
    assert capsys.readouterr().err == line + "\n"


def test_strings_from_artifacts_reach_the_terminal_as_text(tiny_model_file, tmp_path, tapvits):
    """Escape sequences, newlines and rich markup in an artifact's strings are shown, never obeyed:
    an OSC sequence would retitle the terminal or write its clipboard, "[/x]" crashed rich's markup parser."""
    from test_protocol_examples import assert_one_line_failure, rewrite_metadata

    hostile = "\x1b]0;pwned\x07\x1b[2J\nsecond line \u202e"
    kind = tmp_path / "kind.safetensors"
    rewrite_metadata(tiny_model_file, kind, tapvits__kind="model" + hostile)
    refused = tapvits("validate", kind)
    assert_one_line_failure(refused, ExitCode.INVALID_ARTIFACT)
    assert "\x1b" not in refused.stderr and "\\x1b]0;pwned\\x07" in refused.stderr and "\\u202e" in refused.stderr
    named = tmp_path / "named.safetensors"
    classes = [f"[/bogus]{index}[link=file:///etc/passwd]{hostile}" for index in range(TINY_VIT_KWARGS["num_classes"])]
    rewrite_metadata(tiny_model_file, named, model__class_names=json.dumps(classes))
    shown = tapvits("inspect", named)
    assert shown.exit_code == 0 and "\x1b" not in shown.stdout and "\u202e" not in shown.stdout
    evaluated = tapvits("eval", named, "--data", "digits:split=test", "--no-latency", "-o", tmp_path / "r.json")
    assert evaluated.exit_code == 0, evaluated.stderr
    assert "[/bogus]" in evaluated.stderr and "[link=file:///etc/passwd]" in evaluated.stderr
    assert "\x1b" not in evaluated.stderr


def test_json_results_are_standard_json_even_with_infinite_figures(monkeypatch, capsys):
    """Python writes -Infinity and NaN, which jq and browsers refuse; such a figure is null instead."""
    import numpy as np
    import pytest

    from tapvits_cli.cli.options import CURRENT
    from tapvits_cli.cli.output import emit

    monkeypatch.setattr(CURRENT, "json", True)
    emit({"log_likelihood": [float("-inf"), -3.5], "nested": {"nan": float("nan"), "top1": np.float64(0.5)},
          "inf32": np.float32("inf"), "kept": (1, 2)})
    printed = capsys.readouterr().out
    assert json.loads(printed, parse_constant=lambda name: pytest.fail(f"{name} in --json output")) == {
        "log_likelihood": [None, -3.5], "nested": {"nan": None, "top1": 0.5}, "inf32": None, "kept": [1, 2]}
