"""``tapvits report``: one self-contained HTML page about one or several run directories.

The page embeds everything (CSS inline, charts as inline SVG from :mod:`.svg`) and its
Content-Security-Policy forbids loading anything, so it opens the same from a mail
attachment, an offline laptop or a CI artifact store. It shows, per run: the devices'
results, each device's per-block keep ratios (from its plan), and every artifact's
lineage (what it was made from, by hash, linked within the page); over all runs, each
device's top-1 against the fraction of parameters it kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any, Sequence

from tapvits_cli.errors import UsageError
from tapvits_cli.reporting import svg

# default-src 'none': no script, font, frame or request of any kind; images only inline.
CONTENT_SECURITY_POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


@dataclass
class DeviceKeep:
    device: str
    attn: list[float]   # kept fraction of heads, per block
    mlp: list[float]    # kept fraction of MLP neurons, per block


@dataclass
class ArtifactRecord:
    path: str
    step: str
    kind: str
    sha256: str
    created: str | None
    inputs: dict[str, dict[str, str]]


@dataclass
class RunData:
    root: Path
    name: str
    summary: dict[str, Any]
    keep: list[DeviceKeep] = field(default_factory=list)
    artifacts: list[ArtifactRecord] = field(default_factory=list)


def collect_run(root: str | Path) -> RunData:
    """Everything the page shows about one run directory (protocol/run.md), read from its files."""
    from tapvits_cli.artifacts.containers import open_file
    from tapvits_cli.artifacts.plan import read_plan
    from tapvits_cli.artifacts.run_directory import STATE_FILE, SUMMARY_FILE, read_run_state, read_run_summary

    root = Path(root)
    state_file, summary_file = root / STATE_FILE, root / SUMMARY_FILE
    if not root.is_dir() or not state_file.is_file():
        raise UsageError(f"{root}: not a tapvits run directory (no {STATE_FILE}); give the --run-dir of a tapvits run")
    if not summary_file.is_file():
        raise UsageError(f"{root}: the run has no {SUMMARY_FILE} yet; finish it with tapvits run first")
    state, summary = read_run_state(state_file), read_run_summary(summary_file)
    run = RunData(root=root, name=str(summary.get("recipe") or root.name), summary=summary)
    for device in summary.get("devices", []):
        plan_file = root / "devices" / str(device.get("device")) / "plan.safetensors"
        if plan_file.is_file():
            plan = read_plan(plan_file)
            run.keep.append(DeviceKeep(
                device=str(device["device"]),
                attn=[p.heads / b.heads if b.heads else 0.0 for p, b in zip(plan.pruned_blocks, plan.base_blocks)],
                mlp=[p.mlp_hidden / b.mlp_hidden if b.mlp_hidden else 0.0
                     for p, b in zip(plan.pruned_blocks, plan.base_blocks)]))
    for step, record in state["steps"].items():
        output = root / str(record.get("output", ""))
        if not output.is_file():
            continue
        header = open_file(output).header
        run.artifacts.append(ArtifactRecord(
            path=str(record.get("output")), step=step, kind=header.kind, sha256=str(record.get("sha256")),
            created=header.created, inputs={role: entry.to_dict() for role, entry in header.inputs.items()}))
    return run


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _percent(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}%}" if _is_number(value) else "–"


def _number(value: Any, fmt: str) -> str:
    return format(value, fmt) if _is_number(value) else "–"


def _results_table(run: RunData) -> str:
    header = ("device", "top-1", "top-5", "params kept", "parameters", "MACs (M)", "ms @1", "ms @32",
              "selection precision", "class recall", "passed")
    rows = []
    for device in run.summary.get("devices", []):
        cells = (device.get("device"), _percent(device.get("top1")), _percent(device.get("top5")),
                 _percent(device.get("params_kept"), 1), _number(device.get("parameters"), ","),
                 _number(device["macs"] / 1e6 if _is_number(device.get("macs")) else None, ".2f"),
                 _number(device.get("latency_ms_at_1"), ".2f"), _number(device.get("latency_ms_at_32"), ".1f"),
                 _percent(device.get("finetune_precision"), 1), _percent(device.get("finetune_class_recall"), 0),
                 {True: "yes", False: "no"}.get(device.get("passed"), "–"))
        rows.append("<tr>" + "".join(f"<td>{escape(str(cell))}</td>" for cell in cells) + "</tr>")
    mean = run.summary.get("mean")
    if mean:
        rows.append(f'<tr class="mean"><td>mean (by samples)</td><td>{_percent(mean.get("top1"))}</td>'
                    f'<td>{_percent(mean.get("top5"))}</td><td>{_percent(mean.get("params_kept"), 1)}</td>'
                    + "<td></td>" * 7 + "</tr>")
    return ("<table><thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def _keep_charts(run: RunData) -> str:
    if not run.keep:
        return "<p>No plans in this run (budget 1, or no device got as far as allocate).</p>"
    charts = []
    for device in run.keep:
        blocks = [str(index) for index in range(len(device.attn))]
        charts.append(svg.bar_chart(blocks, {"attention heads": device.attn, "MLP neurons": device.mlp},
                                    title=f"{device.device}: kept per block", y_label="kept", y_max=1.0))
    return "".join(f'<figure>{chart}</figure>' for chart in charts)


def _lineage(run: RunData, anchor: str) -> str:
    known = {record.sha256 for record in run.artifacts}
    rows = []
    for record in run.artifacts:
        made_from = []
        for role, entry in record.inputs.items():
            digest = entry.get("sha256", "")
            target = (f'<a href="#{anchor}-{escape(digest)}">{escape(entry.get("name", ""))}</a>' if digest in known
                      else escape(entry.get("name", "")))
            made_from.append(f'<li>{escape(role)}: {escape(entry.get("kind", ""))} {target} '
                             f'<code>{escape(digest)}</code></li>')
        rows.append(f'<tr id="{anchor}-{escape(record.sha256)}"><td><code>{escape(record.path)}</code></td>'
                    f'<td>{escape(record.kind)}</td><td>{escape(record.step)}</td>'
                    f'<td><code>{escape(record.sha256)}</code></td><td><ul>{"".join(made_from)}</ul></td></tr>')
    return ('<table class="lineage"><thead><tr><th>artifact</th><th>kind</th><th>step</th><th>sha256</th>'
            '<th>made from</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>")


def _accuracy_chart(runs: Sequence[RunData]) -> str:
    points: dict[str, list[tuple[float, float, str]]] = {}
    for run in runs:
        label = f"{run.name} ({run.root.name})" if sum(r.name == run.name for r in runs) > 1 else run.name
        series = [(device["params_kept"], device["top1"], device["device"]) for device in run.summary["devices"]
                  if _is_number(device.get("top1")) and _is_number(device.get("params_kept"))]
        if series:
            points[label] = series
    if not points:
        return "<p>No device was evaluated: nothing to plot.</p>"
    return "<figure>" + svg.scatter_chart(points, "top-1 against the share of parameters kept, per device",
                                          "parameters kept (of the base model)", "top-1") + "</figure>"


STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1100px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; vertical-align: top; }
th:first-child, td:first-child { text-align: left; }
tr.mean td { font-weight: bold; }
table.lineage td { text-align: left; font-size: 12px; }
table.lineage ul { margin: 0; padding-left: 1.2em; }
code { font-size: 11px; word-break: break-all; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; }
.facts { color: #555; }
"""


def render(runs: Sequence[RunData], title: str | None = None) -> str:
    """The whole page for ``runs`` (at least one)."""
    from tapvits_cli import __version__

    title = title or ("tapvits report: " + ", ".join(run.name for run in runs))
    sections = [f"<h1>{escape(title)}</h1>", "<h2>Accuracy against kept parameters</h2>", _accuracy_chart(runs)]
    for index, run in enumerate(runs):
        summary = run.summary
        anchor = f"run{index}"
        budget = summary.get("budget")
        facts = [f"directory <code>{escape(str(run.root))}</code>",
                 f"budget {_percent(budget, 0) if isinstance(budget, (int, float)) else '–'} of "
                 f"{_number(summary.get('base_parameters'), ',')} parameters"]
        steps = summary.get("steps")
        if isinstance(steps, dict):
            facts.append(escape(f"{steps.get('total', 0)} steps ({steps.get('ran', 0)} ran, {steps.get('skipped', 0)} "
                                f"unchanged, {steps.get('cache', 0)} from the cache)"))
        if "passed" in summary:   # the failure messages are the summary's text: escaped like every other value
            facts.append("all thresholds passed" if summary["passed"] is True else
                         escape("thresholds failed: " + "; ".join(map(str, summary.get("failures") or []))))
        sections += [f'<h2 id="{anchor}">Run {escape(run.name)}</h2>', f'<p class="facts">{" · ".join(facts)}</p>',
                     "<h3>Per-device results</h3>", _results_table(run),
                     "<h3>Kept units per block</h3>", _keep_charts(run),
                     "<h3>Artifacts and their lineage</h3>", _lineage(run, anchor)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">'
            f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>"
            + "\n".join(sections)
            + f'<p class="facts">Made by tapvits {escape(__version__)}.</p></body></html>\n')
