"""``audit-gmm``: on the device, measure what a GMM reveals about the private samples it was fitted on.

Writes nothing: the audit (aggregate figures only) is its result, and stays on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tapvits_cli.errors import IncompatibleArtifactError, UsageError
from tapvits_cli.stages.common import argument, option


@dataclass(frozen=True, kw_only=True)
class Options:
    gmm: str = argument()
    private_ref: str = option("--private")
    extractor_name: str = option("--extractor")
    held_out_ref: str | None = option("--held-out")
    max_auc: float | None = option("--max-auc")
    batch_size: int = option("--batch-size", 256)
    seed: int = 0
    device: str = "auto"


@dataclass(frozen=True)
class Result:
    report: dict[str, Any]   # what --json prints
    failure: str | None      # the first broken guarantee, or the AUC above --max-auc


def run(options: Options) -> Result:
    from tapvits_cli.artifacts.digests import fingerprint_sha256
    from tapvits_cli.artifacts.gmm import read_gmm
    from tapvits_cli.data import open_dataset
    from tapvits_cli.gmm.privacy import audit_against_data, median_neighbour_distance, membership_auc
    from tapvits_cli.payloads.guarantees import min_support
    from tapvits_cli.runtime import resolve_device
    from tapvits_cli.stages.extractor import embed_dataset, resolve_extractor

    gmm = options.gmm
    if options.max_auc is not None and options.held_out_ref is None:
        raise UsageError("--max-auc needs --held-out: the AUC compares fitted with held-out samples")
    read = read_gmm(gmm)
    mixture, info = read.mixture, read.info
    device = resolve_device(options.device)
    private = open_dataset(options.private_ref)
    recorded = read.artifact.header.inputs.get("data")
    if recorded is None or recorded.sha256 != private.fingerprint():
        raise IncompatibleArtifactError(f"{gmm} was not fitted on {options.private_ref}: its data fingerprint "
                                        f"differs (an audit against other samples would prove nothing)")
    extractor, _ = resolve_extractor(options.extractor_name, device)
    if fingerprint_sha256(extractor.fingerprint) != info.extractor_sha256:
        raise IncompatibleArtifactError(f"--extractor {options.extractor_name} is not the extractor {gmm} was "
                                        "fitted with")

    features = embed_dataset(extractor, private, options.batch_size, device, "embedding private images")
    projected = mixture.projection.apply(features)
    support = min_support(mixture.covariance_type, mixture.dim)
    components = audit_against_data(mixture, info.samples, projected,
                                    median_neighbour_distance(projected, options.seed))
    violations = components.violations(support)
    report = {"gmm": str(gmm), "samples": info.samples, "min_support": support, "components": components.rows(),
              "violations": violations}
    if options.held_out_ref is not None:
        held_out = embed_dataset(extractor, open_dataset(options.held_out_ref), options.batch_size, device,
                                 "embedding held-out images")
        report["membership_auc"] = membership_auc(mixture.log_likelihood(features)[0],
                                                  mixture.log_likelihood(held_out)[0])
        report["held_out_samples"] = len(held_out)
    report["ok"] = not violations and (options.max_auc is None or report["membership_auc"] <= options.max_auc)
    failure = None
    if violations:
        failure = f"{gmm}: {violations[0]}" + (f" (and {len(violations) - 1} more)" if len(violations) > 1 else "")
    elif not report["ok"]:
        failure = f"{gmm}: membership-inference AUC {report['membership_auc']:.3f} exceeds --max-auc {options.max_auc}"
    return Result(report, failure)
