"""The ``gmm`` artifact: a device's mixture, its feature projection and provenance, nothing per sample.

See protocol/gmm.md. This file is what leaves the device, so the writer takes only
aggregate values (mixture parameters, counts, BIC, timings, the extractor fingerprint)
and has no argument through which a sample, label or per-sample value could travel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from tapvits_cli.artifacts.containers import ArtifactFile, load_safetensors, write_safetensors
from tapvits_cli.artifacts.digests import tensor_rule, tensors_sha256
from tapvits_cli.artifacts.header import Header, LineageEntry, compact_json, finite_number, parse_decimal
from tapvits_cli.artifacts.kinds import KindSpec, Summary, Table, read_artifact, register
from tapvits_cli.payloads.guarantees import audit_parameters, min_support
from tapvits_cli.payloads.mixture import Mixture, Projection
from tapvits_cli.payloads.zcdp import epsilon_for
from tapvits_cli.vocabulary import COVARIANCE_TYPES, MAX_COMPONENTS, MAX_FEATURE_DIM

KIND = "gmm"
VERSION = 3   # v3: gmm.tensors_sha256 by the container tensor-hash rule (v2: per-component guarantees)
NAMESPACE = "gmm"
_MIXTURE_TENSORS = ("weights", "means", "covariances", "precisions_cholesky")
_PROJECTION_TENSORS = ("projection.mean", "projection.scale")
_REQUIRED_KEYS = ("covariance_type", "components", "dim", "feature_dim", "samples", "bic", "fit_seconds",
                  "extract_seconds", "extractor", "extractor_sha256", "privacy", "tensors_sha256")


@dataclass(frozen=True)
class GmmInfo:
    """Everything a gmm artifact says besides the mixture parameters; all aggregate."""

    samples: int
    bic: Mapping[int, float]          # K → BIC, for every K that was fitted
    fit_seconds: float
    extract_seconds: float
    extractor: Mapping[str, Any]      # models.extract.Extractor.fingerprint
    privacy: Mapping[str, Any]        # floors and noise used; "dp" when differentially private
    converged: bool | None = None

    @property
    def extractor_sha256(self) -> str:
        from tapvits_cli.artifacts.digests import fingerprint_sha256

        return fingerprint_sha256(self.extractor)


def write_gmm(path: str | os.PathLike, mixture, info: GmmInfo, params: Mapping[str, Any],
              inputs: Mapping[str, LineageEntry] | None = None):
    """Write a fitted :class:`~tapvits_cli.payloads.mixture.Mixture` and its provenance; returns the path.

    NumPy only: this runs on the device, which has no torch.
    """
    tensors = {
        "weights": mixture.weights, "means": mixture.means, "covariances": mixture.covariances,
        "precisions_cholesky": mixture.precisions_cholesky,
        "projection.mean": mixture.projection.mean, "projection.scale": mixture.projection.scale,
    }
    if mixture.projection.components is not None:
        tensors["projection.components"] = mixture.projection.components
    tensors = {name: np.ascontiguousarray(value, dtype=np.float64) for name, value in tensors.items()}
    metadata = {
        "covariance_type": mixture.covariance_type,
        "components": str(mixture.components),
        "dim": str(mixture.dim),
        "feature_dim": str(mixture.feature_dim),
        "samples": str(int(info.samples)),
        "bic": compact_json({str(k): float(v) for k, v in sorted(info.bic.items())}),
        "fit_seconds": repr(float(info.fit_seconds)),
        "extract_seconds": repr(float(info.extract_seconds)),
        "extractor": compact_json(dict(info.extractor)),
        "extractor_sha256": info.extractor_sha256,
        "privacy": compact_json(dict(info.privacy)),
        "tensors_sha256": tensors_sha256(tensors),
    }
    if info.converged is not None:
        metadata["converged"] = "true" if info.converged else "false"
    if mixture.projection.unit_norm:
        metadata["unit_norm"] = "true"
    header = Header(kind=KIND, version=VERSION, inputs=dict(inputs or {}), params=dict(params))
    return write_safetensors(path, tensors, header, {f"{NAMESPACE}.{k}": v for k, v in metadata.items()})


@dataclass(frozen=True)
class Gmm:
    """A read gmm artifact: the mixture, everything else it says (all aggregate), the opened file."""

    mixture: Mixture
    info: GmmInfo
    artifact: ArtifactFile


def read_gmm(path: str | os.PathLike) -> Gmm:
    """Read and check a gmm artifact (every rule of protocol/gmm.md)."""
    artifact = read_artifact(path, expect=KIND)
    mixture, info, stored_cholesky = _parse(artifact)
    _check(artifact, mixture, info, stored_cholesky)
    return Gmm(mixture, info, artifact)


# --- parsing and checks -------------------------------------------------------------------

def _int(artifact: ArtifactFile, key: str, minimum: int = 1, maximum: int = 2 ** 63 - 1) -> int:
    value = artifact.metadata[f"{NAMESPACE}.{key}"]
    try:
        number = parse_decimal(value)
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise artifact.fail(f"'{NAMESPACE}.{key}' must be an integer >= {minimum}, got {_shown(value)}")
    if number > maximum:   # beyond 64 bits, weights × samples overflowed a float (exit 1)
        raise artifact.fail(f"'{NAMESPACE}.{key}' must be at most {maximum:,}, got {_shown(value)}")
    return number


def _shown(value: str) -> str:
    return repr(value) if len(value) <= 40 else repr(value[:37] + "...")


def _float(artifact: ArtifactFile, key: str) -> float:
    try:
        value = float(artifact.metadata[f"{NAMESPACE}.{key}"])
    except ValueError:
        raise artifact.fail(f"'{NAMESPACE}.{key}' is not a number") from None
    if not np.isfinite(value) or value < 0:
        raise artifact.fail(f"'{NAMESPACE}.{key}' must be a finite number >= 0")
    return value


def _covariance_shape(covariance_type: str, k: int, d: int) -> tuple[int, ...]:
    return {"full": (k, d, d), "tied": (d, d), "diag": (k, d), "spherical": (k,)}[covariance_type]


def _parse(artifact: ArtifactFile):
    """Metadata and tensors into a Mixture and GmmInfo; structural checks only."""
    for key in _REQUIRED_KEYS:
        if f"{NAMESPACE}.{key}" not in artifact.metadata:
            raise artifact.fail(f"required key '{NAMESPACE}.{key}' is missing")
    covariance_type = artifact.metadata[f"{NAMESPACE}.covariance_type"]
    if covariance_type not in COVARIANCE_TYPES:
        raise artifact.fail(f"unknown covariance type {covariance_type!r}")
    k, d = _int(artifact, "components", maximum=MAX_COMPONENTS), _int(artifact, "dim")
    feature_dim = _int(artifact, "feature_dim", maximum=MAX_FEATURE_DIM)
    expected = {"weights": (k,), "means": (k, d), "covariances": _covariance_shape(covariance_type, k, d),
                "precisions_cholesky": _covariance_shape(covariance_type, k, d),
                "projection.mean": (feature_dim,), "projection.scale": (feature_dim,)}
    has_pca = "projection.components" in artifact.tensors
    if has_pca:
        expected["projection.components"] = (d, feature_dim)
    elif d != feature_dim:
        raise artifact.fail(f"without projection.components, dim ({d}) must equal feature_dim ({feature_dim})")
    for name, shape in expected.items():
        info = artifact.tensors.get(name)
        if info is None:
            raise artifact.fail(f"required tensor '{name}' is missing")
        if info.dtype != "F64" or info.shape != shape:
            raise artifact.fail(f"tensor '{name}' must be F64 {list(shape)}, is {info.dtype} {list(info.shape)}")
    tensors = {name: t for name, t in load_safetensors(artifact, numpy=True).items() if name in expected}
    if tensors_sha256(tensors, tensor_rule(KIND, artifact.header.version)) != artifact.metadata[f"{NAMESPACE}.tensors_sha256"]:
        raise artifact.fail(f"tensors do not match '{NAMESPACE}.tensors_sha256' (corrupted)")
    bic_raw, extractor, privacy = (artifact.json_field(f"{NAMESPACE}.{key}") for key in ("bic", "extractor", "privacy"))
    try:
        bic = {parse_decimal(key): float(value) for key, value in bic_raw.items() if finite_number(value)}
    except (AttributeError, TypeError, ValueError):
        bic = None
    if bic is None or len(bic) != len(bic_raw):
        raise artifact.fail(f"'{NAMESPACE}.bic' must map each K (a decimal integer) to a finite number")
    if not isinstance(extractor, dict) or not isinstance(privacy, dict):
        raise artifact.fail(f"'{NAMESPACE}.extractor' and '{NAMESPACE}.privacy' must be JSON objects")
    unit_norm = artifact.metadata.get(f"{NAMESPACE}.unit_norm", "false")
    if unit_norm not in ("true", "false"):
        raise artifact.fail(f"'{NAMESPACE}.unit_norm' must be 'true' or 'false', got {unit_norm!r}")
    projection = Projection(tensors["projection.mean"], tensors["projection.scale"], tensors.get("projection.components"),
                            unit_norm=unit_norm == "true")
    mixture = Mixture(tensors["weights"], tensors["means"], tensors["covariances"], covariance_type, projection)
    converged = artifact.metadata.get(f"{NAMESPACE}.converged")
    info = GmmInfo(samples=_int(artifact, "samples"), bic=bic, fit_seconds=_float(artifact, "fit_seconds"),
                   extract_seconds=_float(artifact, "extract_seconds"), extractor=extractor, privacy=privacy,
                   converged=None if converged is None else converged == "true")
    return mixture, info, tensors["precisions_cholesky"]


def _check(artifact: ArtifactFile, mixture, info: GmmInfo, stored_cholesky: np.ndarray) -> None:
    """The content rules: a proper mixture, consistent factors, a matching fingerprint, BIC's choice."""
    arrays = (mixture.weights, mixture.means, mixture.covariances, mixture.projection.mean, mixture.projection.scale)
    if not all(np.isfinite(a).all() for a in arrays) or (
            mixture.projection.components is not None and not np.isfinite(mixture.projection.components).all()):
        raise artifact.fail("tensors contain NaN or infinite values")
    if (mixture.weights < 0).any() or abs(mixture.weights.sum() - 1.0) > 1e-6:
        raise artifact.fail(f"component weights must be >= 0 and sum to 1 (sum {mixture.weights.sum():.8g})")
    if (mixture.projection.scale <= 0).any():
        raise artifact.fail("projection.scale must be positive")
    covariances = np.asarray(mixture.covariances)
    if mixture.covariance_type in ("full", "tied") and not np.allclose(covariances, np.swapaxes(covariances, -1, -2)):
        raise artifact.fail("covariances are not symmetric")
    try:
        computed = mixture.precisions_cholesky
    except ValueError:
        raise artifact.fail("covariances are not positive definite") from None
    if not np.allclose(stored_cholesky, computed, rtol=1e-6, atol=1e-9):
        raise artifact.fail("precisions_cholesky does not match the covariances (corrupted)")
    try:
        mixture.check_range()
    except ValueError as exc:
        raise artifact.fail(str(exc)) from None
    recorded_sha = artifact.metadata[f"{NAMESPACE}.extractor_sha256"]
    if recorded_sha != info.extractor_sha256:
        raise artifact.fail(f"'{NAMESPACE}.extractor_sha256' does not match the hash of '{NAMESPACE}.extractor'")
    if info.extractor.get("feature_dim") != mixture.feature_dim:
        raise artifact.fail(f"the extractor gives {info.extractor.get('feature_dim')}-dim features, "
                              f"the projection expects {mixture.feature_dim}")
    for key in ("min_samples", "noise_scale"):
        if not finite_number(info.privacy.get(key)):
            raise artifact.fail(f"'{NAMESPACE}.privacy' lacks the number '{key}'")
    dp = info.privacy.get("dp")
    if dp is not None:
        _check_dp_record(artifact, dp, info)
    elif mixture.components not in info.bic or info.bic[mixture.components] > min(info.bic.values()):
        raise artifact.fail(f"K={mixture.components} is not the lowest-BIC entry of '{NAMESPACE}.bic'")
    _check_guarantees(artifact, mixture, info)


def _check_dp_record(artifact: ArtifactFile, dp, info: GmmInfo) -> None:
    """A differentially private fit states its (ε, δ) and ρ, and computed no BIC (that would spend budget)."""
    if not isinstance(dp, dict) or not all(finite_number(dp.get(key)) for key in ("epsilon", "delta", "rho")):
        raise artifact.fail(f"'{NAMESPACE}.privacy.dp' must hold the numbers epsilon, delta and rho")
    if not (dp["epsilon"] > 0 and 0 < dp["delta"] < 1 and dp["rho"] > 0):
        raise artifact.fail(f"'{NAMESPACE}.privacy.dp' needs epsilon > 0, 0 < delta < 1 and rho > 0")
    if abs(epsilon_for(dp["rho"], dp["delta"]) - dp["epsilon"]) > 1e-9 * max(1.0, dp["epsilon"]):
        raise artifact.fail(f"'{NAMESPACE}.privacy.dp': rho {dp['rho']} does not give epsilon {dp['epsilon']} "
                            f"at delta {dp['delta']}")
    if info.bic:
        raise artifact.fail(f"a differentially private '{NAMESPACE}.bic' must be empty")


def _check_guarantees(artifact: ArtifactFile, mixture, info: GmmInfo) -> None:
    """The per-component guarantees that the parameters alone show (protocol/gmm.md)."""
    with np.errstate(over="raise", invalid="raise"):
        try:
            violations = audit_parameters(mixture, info.samples).violations(
                min_support(mixture.covariance_type, mixture.dim))
        except FloatingPointError:
            raise artifact.fail("the privacy guarantees cannot be checked: its variances overflow") from None
    if violations:
        raise artifact.fail(f"breaks a per-component privacy guarantee: {violations[0]}")


def _validate(artifact: ArtifactFile) -> None:
    mixture, info, stored_cholesky = _parse(artifact)
    _check(artifact, mixture, info, stored_cholesky)


def _summarize(artifact: ArtifactFile) -> Summary:
    mixture, info, _ = _parse(artifact)
    extractor = info.extractor
    figures = {
        "components": mixture.components,
        "dim": mixture.dim,
        "feature_dim": mixture.feature_dim,
        "covariance_type": mixture.covariance_type,
        "pca": mixture.projection.components is not None,
        "standardized": bool((mixture.projection.scale != 1.0).any()),
        "samples": info.samples,
        "chosen_by": (f"lowest BIC over K in {sorted(info.bic)}" if "dp" not in info.privacy
                      else "fixed K (differentially private fit)"),
        "unit_norm": mixture.projection.unit_norm,
        "fit_seconds": round(info.fit_seconds, 3),
        "extract_seconds": round(info.extract_seconds, 3),
        "extractor": f"{extractor.get('architecture')} {extractor.get('feature_layer')} "
                     f"(weights {str(extractor.get('weights_sha256'))[:12]})",
        "extractor_sha256": info.extractor_sha256,
        "privacy": dict(info.privacy),
    }
    if info.converged is not None:
        figures["converged"] = info.converged
    tables = [
        Table("BIC per K", ["K", "BIC", "chosen"],
              [[k, v, "*" if k == mixture.components else ""] for k, v in sorted(info.bic.items())]),
        Table("components", ["component", "weight", "effective support", "variance ratio"],
              [[row["component"], row["weight"], row["effective_support"], row["variance_ratio"]]
               for row in audit_parameters(mixture, info.samples).rows()]),
    ]
    return Summary(figures=figures, tables=tables)


SPEC = register(KindSpec(
    name=KIND, format="safetensors", version=VERSION, validate=_validate, summarize=_summarize,
    description="a device's Gaussian mixture over extractor features, with its projection and provenance",
))
