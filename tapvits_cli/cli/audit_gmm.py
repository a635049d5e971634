"""``tapvits audit-gmm``: on the device, measure what a GMM reveals about the private samples."""

from __future__ import annotations

import click

from tapvits_cli.cli.extractor import EXTRACTOR_HELP
from tapvits_cli.cli.options import CURRENT, FiniteFloat, global_options
from tapvits_cli.errors import BelowThresholdError, IncompatibleArtifactError, UsageError


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
    from tapvits_cli.artifacts.digests import fingerprint_sha256
    from tapvits_cli.artifacts.gmm import read_gmm
    from tapvits_cli.stages.extractor import embed_dataset, resolve_extractor
    from tapvits_cli.cli.output import emit, log
    from tapvits_cli.data import open_dataset
    from tapvits_cli.gmm.privacy import audit_against_data, median_neighbour_distance, membership_auc, min_support
    from tapvits_cli.runtime import resolve_device

    if max_auc is not None and held_out_ref is None:
        raise UsageError("--max-auc needs --held-out: the AUC compares fitted with held-out samples")
    mixture, info, artifact = read_gmm(gmm)
    device = resolve_device(CURRENT.device)
    private = open_dataset(private_ref)
    recorded = artifact.header.inputs.get("data")
    if recorded is None or recorded.sha256 != private.fingerprint():
        raise IncompatibleArtifactError(f"{gmm} was not fitted on {private_ref}: its data fingerprint differs "
                                        f"(an audit against other samples would prove nothing)")
    extractor, _ = resolve_extractor(extractor_name, device)
    if fingerprint_sha256(extractor.fingerprint) != info.extractor_sha256:
        raise IncompatibleArtifactError(f"--extractor {extractor_name} is not the extractor {gmm} was fitted with")

    features = embed_dataset(extractor, private, batch_size, device, "embedding private images")
    projected = mixture.projection.apply(features)
    support = min_support(mixture.covariance_type, mixture.dim)
    components = audit_against_data(mixture, info.samples, projected, median_neighbour_distance(projected, CURRENT.seed))
    violations = components.violations(support)
    report = {"gmm": str(gmm), "samples": info.samples, "min_support": support, "components": components.rows(),
              "violations": violations}
    if held_out_ref is not None:
        held_out = embed_dataset(extractor, open_dataset(held_out_ref), batch_size, device, "embedding held-out images")
        report["membership_auc"] = membership_auc(mixture.log_likelihood(features)[0],
                                                  mixture.log_likelihood(held_out)[0])
        report["held_out_samples"] = len(held_out)
    report["ok"] = not violations and (max_auc is None or report["membership_auc"] <= max_auc)

    _render(report)
    emit(report, "ok" if report["ok"] else "failed")
    if violations:
        raise BelowThresholdError(f"{gmm}: {violations[0]}" + (
            f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""))
    if not report["ok"]:
        raise BelowThresholdError(f"{gmm}: membership-inference AUC {report['membership_auc']:.3f} "
                                  f"exceeds --max-auc {max_auc}")
    log(f"{gmm}: every component keeps the guarantees")


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
