"""``tapvits report RUN_DIR... -o report.html``: a self-contained HTML page about finished runs."""

from __future__ import annotations

import click

from tapvits_cli.cli.options import WritingCommand, global_options
from tapvits_cli.cli.output import emit


@click.command("report", cls=WritingCommand, short_help="One self-contained HTML page about run directories.")
@click.argument("run_dirs", metavar="RUN_DIR...", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="HTML file to write.")
@click.option("--title", help="The page's title [default: tapvits report: RECIPE, ...].")
@global_options
def command(run_dirs: tuple[str, ...], output: str, title: str | None) -> None:
    """Write one HTML page about the runs in RUN_DIR... (the --run-dir of `tapvits run`):
    each device's results, its kept heads and MLP neurons per block as charts, every
    artifact's lineage (what it was made from, by SHA-256), and over all runs each
    device's top-1 against the share of parameters it kept (give several runs, e.g. one
    per budget, to compare them).

    The page is self-contained: styles and charts (SVG) are inline and its
    Content-Security-Policy lets it load nothing, so it can be mailed or archived as is.

    Example: tapvits report runs/quickstart runs/quickstart-50 -o report.html
    """
    from tapvits_cli.artifacts.files import atomic_write
    from tapvits_cli.reporting.html import collect_run, render

    runs = [collect_run(root) for root in run_dirs]
    page = render(runs, title)
    with atomic_write(output) as tmp:
        tmp.write_text(page, encoding="utf-8")
    emit({"output": output, "runs": [str(run.root) for run in runs],
          "devices": sum(len(run.summary.get("devices", [])) for run in runs)}, output)
