"""``tapvits audit-gmm``: on the device, measure what a GMM reveals about the private samples."""

from __future__ import annotations

import click

from tapvits_cli.cli.extractor import EXTRACTOR_HELP
from tapvits_cli.cli.options import CURRENT, FiniteFloat, global_options
from tapvits_cli.errors import BelowThresholdError


@click.command("audit-gmm", short_help="On a device: audit a GMM against the private data it was fitted on.")
@click.argument("gmm", type=click.Path(exists=True, dir_okay=False))
@click.option("--private", "private_ref", required=True, metavar="DATA",
              help="The private dataset the GMM was fitted on (its fingerprint must match the GMM's lineage).")
@click.option("-e", "--extractor", "extractor_name", required=True, metavar="EXTRACTOR", help=EXTRACTOR_HELP)
@click.option("--held-out", "held_out_ref", metavar="DATA", default=None,
              help="Private samples of the same device that the fit did not see: adds the membership-inference AUC.")
@click.option("--max-auc", type=FiniteFloat(0.5, 1.0), default=None,
              help="Fail (exit 6) when the membership-inference AUC exceeds this (needs --held-out).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images embedded per forward pass.")
@global_options
def command(gmm: str, private_ref: str, extractor_name: str, held_out_ref: str | None, max_auc: float | None,
            batch_size: int) -> None:
    """Audit GMM against the private data it was fitted on; prints the audit.

    Per component: weight, effective support (weight × n), the number of private samples
    whose most likely component it is, its smallest variance relative to the data's,
    and the distance from its mean to the nearest private sample in median
    nearest-neighbour distances. With --held-out, the membership-inference AUC: how
    well the GMM's log-likelihood tells the fitted samples from held-out ones (0.5:
    nothing learned about who was in the fit). Exits 6 when a component breaks a
    guarantee of protocol/gmm.md or the AUC exceeds --max-auc. Runs on the device: it
    needs the private data, and its output (aggregate figures only) stays there.

    Example: tapvits audit-gmm device.gmm.safetensors --private "digits:classes=0-3:fold=0/2"
    --held-out "digits:classes=0-3:fold=1/2" --extractor base.safetensors
    """
    from tapvits_cli.cli.output import emit, log
    from tapvits_cli.cli.stage_call import run_stage
    from tapvits_cli.stages import audit_gmm

    result = run_stage(audit_gmm)
    _render(result.report)
    emit(result.report, "ok" if result.report["ok"] else "failed")
    if result.failure:
        raise BelowThresholdError(result.failure)
    log(f"{result.report['gmm']}: every component keeps the guarantees")


def _render(report: dict) -> None:
    """The per-component table and the AUC on stderr."""
    from rich.table import Table

    from tapvits_cli.cli.output import stderr_console

    if CURRENT.verbosity < 0:
        return
    table = Table("component", "weight", "effective support", "assigned", "variance ratio", "distance ratio",
                  title=f"min support {report['min_support']} samples")
    for row in report["components"]:
        table.add_row(str(row["component"]), f"{row['weight']:.4f}", f"{row['effective_support']:.1f}",
                      str(row["assigned"]), f"{row['variance_ratio']:.3g}", f"{row['distance_ratio']:.3g}")
    console = stderr_console()
    console.print(table)
    if "membership_auc" in report:
        console.print(f"membership-inference AUC {report['membership_auc']:.3f} "
                      f"({report['samples']} fitted vs {report['held_out_samples']} held-out samples; 0.5 = none)")
