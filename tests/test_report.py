"""`inspect` on everything a run writes, and `tapvits report`'s HTML page (opened in a real
headless browser when Debian's chromium is installed)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tapvits_cli.errors import ExitCode

from test_run import TINY_RECIPE


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    """Two finished tiny runs of one device, budgets 70% and 50%, sharing a stage cache (composite scores)."""
    from tapvits_cli.cli.main import main

    root = tmp_path_factory.mktemp("runs")
    recipe = root / "recipe.yaml"
    stages = {**TINY_RECIPE["stages"], "score": {**TINY_RECIPE["stages"]["score"], "criterion": "composite"}}
    recipe.write_text(yaml.safe_dump({**TINY_RECIPE, "devices": TINY_RECIPE["devices"][:1], "stages": stages},
                                     sort_keys=False))   # the composite: --units shows its three components
    dirs = []
    for budget in (0.7, 0.5):
        run_dir = root / f"run-{int(budget * 100)}"
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            code = main(["run", str(recipe), "--run-dir", str(run_dir), "--cache", str(root / "cache"),
                         "--set", f"budget={budget}"])
        assert code == 0, err.getvalue()
        dirs.append(run_dir)
    return dirs


# --- inspect -----------------------------------------------------------------------------

def test_inspect_takes_several_files_and_shows_fractions_as_percentages(run_dirs, tapvits):
    device = run_dirs[0] / "devices" / "low"
    result = tapvits("inspect", device / "report.json", device / "plan.safetensors")
    assert result.exit_code == 0, result.stderr
    report = json.loads((device / "report.json").read_text())
    assert f"{report['top1']:.2%}" in result.stdout and "kept units per block" in result.stdout
    both = tapvits("--json", "inspect", device / "report.json", device / "plan.safetensors").json()["inspected"]
    assert [d["kind"] for d in both] == ["report", "plan"] and both[0]["figures"]["top1"] == report["top1"]


def test_inspect_shows_a_pruned_models_widths_as_kept_of_built(run_dirs, tapvits):
    pruned = run_dirs[1] / "devices" / "low" / "pruned.safetensors"
    document = tapvits("--json", "inspect", pruned).json()
    blocks = next(t for t in document["tables"] if t["title"] == "blocks")
    heads = [row[1] for row in blocks["rows"]]
    assert document["figures"]["pruned"] is True and all(h.endswith("/3") for h in heads)
    assert any(h != "3/3" for h in heads + [row[3] for row in blocks["rows"]])
    base = tapvits("--json", "inspect", run_dirs[1] / "base" / "model.safetensors").json()
    assert base["figures"]["pruned"] is False
    assert next(t for t in base["tables"] if t["title"] == "blocks")["rows"][0][1] == 3


def test_inspect_units_says_which_head_the_plan_dropped_and_why(run_dirs, tapvits):
    from tapvits_cli.artifacts.plan import read_plan
    from tapvits_cli.artifacts.scores import read_scores

    device = run_dirs[1] / "devices" / "low"
    scores, plan = device / "scores.safetensors", device / "plan.safetensors"
    document = tapvits("--json", "inspect", scores, plan, "--units", "--block", "1").json()["inspected"][0]
    heads = next(t for t in document["tables"] if t["title"].startswith("heads"))
    assert heads["columns"] == ["block", "head", "score", "activity", "redundancy", "relevance", "rank", "kept"]
    stored, kept = read_scores(scores).values[(1, "attn")], read_plan(plan).keep["attn"][1]
    assert [row[0] for row in heads["rows"]] == [1, 1, 1]
    for row in heads["rows"]:
        assert row[2] == pytest.approx(float(stored["score"][row[1]]))
        assert row[7] == ("yes" if row[1] in kept else "no")
    best = max(heads["rows"], key=lambda row: row[2])
    assert best[6] == "1/3"
    text = tapvits("inspect", scores, "--units", "--block", "1")
    assert text.exit_code == 0 and "redundancy" in text.stdout and "kept" not in text.stdout
    assert tapvits("inspect", scores, "--units", "--block", "9").exit_code == ExitCode.USAGE
    assert tapvits("inspect", scores, "--block", "1").exit_code == ExitCode.USAGE


def test_inspect_reads_run_records_and_run_directories(run_dirs, tapvits):
    run_dir = run_dirs[0]
    state = tapvits("--json", "inspect", run_dir / "run.json").json()
    assert state["kind"] == "run-state" and state["figures"]["steps"] == len(state["tables"][0]["rows"])
    summary = tapvits("inspect", run_dir / "summary.json")
    top1 = json.loads((run_dir / "summary.json").read_text())["devices"][0]["top1"]
    assert summary.exit_code == 0 and f"{top1:.2%}" in summary.stdout
    directory = tapvits("--json", "inspect", run_dir).json()
    assert directory["kind"] == "run-directory"
    artifacts = next(t for t in directory["tables"] if t["title"] == "artifacts")
    assert {"model", "plan", "scores", "report", "metric-set"} <= {row[1] for row in artifacts["rows"]}
    units = tapvits("--json", "inspect", run_dir, "--units").json()
    assert any(t["title"] == "low: heads (kept: plan " + str(run_dir / "devices/low/plan.safetensors") + ")"
               for t in units["tables"])
    assert tapvits("inspect", run_dir / "devices").exit_code == ExitCode.USAGE   # a directory, not a run


def test_inspect_reads_its_own_onnx_exports(run_dirs, tapvits, tmp_path):
    pytest.importorskip("onnx")
    model = run_dirs[1] / "devices" / "low" / "model.safetensors"
    exported = tmp_path / "device.onnx"
    assert tapvits("export", model, "-o", exported, "--no-check").exit_code == 0
    document = tapvits("--json", "inspect", exported).json()
    assert document["kind"] == "onnx-export" and document["format"] == "onnx"
    assert document["inputs"]["model"]["name"].endswith("model.safetensors")
    graph = document["tables"][0]
    assert [row[:2] for row in graph["rows"]] == [["images", "input"], ["logits", "output"]]
    assert next(t for t in document["tables"] if t["title"] == "blocks")["rows"][0][1].endswith("/3")
    foreign = tmp_path / "foreign.onnx"
    foreign.write_bytes(b"\x08\x07not a graph")
    assert tapvits("inspect", foreign).exit_code == ExitCode.INVALID_ARTIFACT


# --- report ------------------------------------------------------------------------------

def test_report_is_one_self_contained_page(run_dirs, tapvits, tmp_path):
    page = tmp_path / "report.html"
    result = tapvits("report", *run_dirs, "-o", page)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{page}\n"
    html = page.read_text()
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert "default-src 'none'" in html
    assert html.count("<svg") == 1 + len(run_dirs)     # accuracy vs parameters, one keep chart per device and run
    summary = json.loads((run_dirs[0] / "summary.json").read_text())
    assert f"{summary['devices'][0]['top1']:.2%}" in html
    state = json.loads((run_dirs[0] / "run.json").read_text())
    for record in state["steps"].values():               # every artifact's lineage, by hash
        assert f'id="run0-{record["sha256"]}"' in html
    assert 'href="#run0-' in html                        # inputs made in the run link to their row


def test_report_refuses_what_is_not_a_finished_run(run_dirs, tmp_path, tapvits):
    assert tapvits("report", tmp_path, "-o", tmp_path / "r.html").exit_code == ExitCode.USAGE
    assert not (tmp_path / "r.html").exists()
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dirs[0], damaged, ignore=shutil.ignore_patterns(".lock"))
    summary = json.loads((damaged / "summary.json").read_text())
    (damaged / "summary.json").write_text(json.dumps({**summary, "devices": {"low": 1}}))
    result = tapvits("report", damaged, "-o", tmp_path / "r.html")
    assert result.exit_code == ExitCode.INVALID_ARTIFACT and "'devices'" in result.stderr
    for device in ("../../../outside", "low\n"):   # report builds paths from device names
        (damaged / "summary.json").write_text(json.dumps({**summary, "devices": [{**summary["devices"][0],
                                                                                  "device": device}]}))
        result = tapvits("report", damaged, "-o", tmp_path / "r.html")
        assert result.exit_code == ExitCode.INVALID_ARTIFACT and "'device' is a device name" in result.stderr
    for odd, reason in (({"failures": [1]}, "not what tapvits run writes"), ({"steps": "many"}, "not what"),
                        ({"steps": {"total": -1}}, "not what"), ({"budget": 10 ** 400}, "beyond a 64-bit integer"),
                        ({"mean": {"top1": float("nan")}}, "NaN is not a JSON number"),   # Python writes NaN
                        ({"devices": [{**summary["devices"][0], "top1": float("inf")}]}, "Infinity is not a JSON"),
                        # a review: a top-1 of 1e17 left the chart's axis without a scale (exit 1)
                        ({"devices": [{**summary["devices"][0], "params_kept": 1e17}]}, "fractions from 0 to 1"),
                        ({"mean": {**summary["mean"], "top1": -0.5}}, "fractions from 0 to 1"),
                        ({"devices": [{**summary["devices"][0], "top1": "high"}]}, "fractions from 0 to 1")):
        (damaged / "summary.json").write_text(json.dumps({**summary, **odd}))
        result = tapvits("report", damaged, "-o", tmp_path / "r.html")
        assert result.exit_code == ExitCode.INVALID_ARTIFACT and reason in result.stderr, odd
    (damaged / "summary.json").write_text(json.dumps({**summary, "devices": [{**summary["devices"][0], "top1": None}]}))
    assert tapvits("report", damaged, "-o", tmp_path / "r.html").exit_code == 0   # not evaluated: shown as "–"


def test_report_escapes_what_the_summary_says(run_dirs, tmp_path, tapvits):
    """A summary is anyone's file: its failure messages are text, never markup (a meta refresh navigated away)."""
    edited = tmp_path / "edited"
    shutil.copytree(run_dirs[0], edited, ignore=shutil.ignore_patterns(".lock"))
    summary = json.loads((edited / "summary.json").read_text())
    markup = '<meta http-equiv="refresh" content="0;url=file:///etc/passwd"><script>alert(1)</script>'
    (edited / "summary.json").write_text(json.dumps({**summary, "passed": False, "failures": [markup]}))
    page = tmp_path / "r.html"
    assert tapvits("report", edited, "-o", page).exit_code == 0
    html = page.read_text()
    assert "<meta http-equiv=\"refresh\"" not in html and "<script>" not in html
    assert "thresholds failed: &lt;meta http-equiv=&quot;refresh&quot;" in html


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_renders_in_a_headless_browser_without_errors(run_dirs, tapvits, tmp_path):
    from PIL import Image

    page = tmp_path / "report.html"
    assert tapvits("report", *run_dirs, "-o", page).exit_code == 0
    shot = tmp_path / "shot.png"
    browser = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--window-size=1200,1400", f"--screenshot={shot}", page.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert shot.is_file(), browser.stderr[-2000:]
    console = [line for line in browser.stderr.splitlines() if "CONSOLE" in line or "Content Security Policy" in line
               or "Failed to load resource" in line]
    assert console == []
    image = Image.open(shot).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20)
    counts = {colour: count for count, colour in colours}
    # the charts' bars and points are drawn in the palette's first two colours
    assert counts.get((0x00, 0x72, 0xB2), 0) > 200 and counts.get((0xE6, 0x9F, 0x00), 0) > 200


def test_inspect_refuses_damaged_run_records_with_one_line(run_dirs, tapvits, tmp_path):
    state = tmp_path / "run.json"
    state.write_text(json.dumps({"version": 1, "steps": {"base": "done"}}))
    result = tapvits("inspect", state)
    assert result.exit_code == ExitCode.INVALID_ARTIFACT and len(result.stderr.splitlines()) == 1
    for record in ({"seconds": "slow", "output": "base/model.safetensors"}, {"seconds": 1.0, "output": 3},
                   {"seconds": 1.0, "output": "../../outside/evil.safetensors"},   # report and inspect open outputs
                   {"seconds": 1.0, "output": "/etc/passwd"}, {"seconds": float("nan"), "output": "base/m.st"},
                   {"seconds": 10 ** 400, "output": "base/m.st"}):   # overflowed math.isfinite: exit 1
        state.write_text(json.dumps({"version": 1, "steps": {"base": record}}))
        result = tapvits("inspect", state)
        assert result.exit_code == ExitCode.INVALID_ARTIFACT, record
        assert any(reason in result.stderr for reason in ("not a step record", "NaN is not a JSON number",
                                                          "beyond a 64-bit integer")), record
        assert tapvits("inspect", tmp_path).exit_code == ExitCode.INVALID_ARTIFACT, record   # the run directory
    other = tmp_path / "other.json"
    other.write_text("[1, 2]")
    assert tapvits("inspect", other).exit_code == ExitCode.INVALID_ARTIFACT
