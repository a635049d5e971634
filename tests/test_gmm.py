"""`tapvits fit-gmm` and the gmm artifact: BIC search, refusal rule, determinism, validity, privacy."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from tapvits_cli.artifacts.containers import open_file
from tapvits_cli.artifacts.digests import fingerprint_sha256
from tapvits_cli.artifacts.gmm import GmmInfo, read_gmm, write_gmm
from tapvits_cli.errors import ExitCode, UsageError
from tapvits_cli.gmm.fit import check_feasible, fit_mixture
from tapvits_cli.payloads.guarantees import min_support
from tapvits_cli.payloads.mixture import Mixture, score_in_chunks

PRIVATE = "digits:classes=0,1"  # 287 training images of two digits


def fit_cli(tapvits, model, output, *extra, data=PRIVATE):
    return tapvits("fit-gmm", "--data", data, "--extractor", model, "-o", output, *extra)


@pytest.fixture
def gmm_file(tmp_path, tapvits, tiny_model_file):
    path = tmp_path / "device.gmm.safetensors"
    result = fit_cli(tapvits, tiny_model_file, path, "--pca-dim", "8")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{path}\n"
    return path


def clusters(centres: int, per_cluster: int, dim: int, seed: int = 0) -> np.ndarray:
    """Well separated Gaussian blobs: the number of components BIC must find."""
    rng = np.random.default_rng(seed)
    locations = rng.normal(scale=20.0, size=(centres, dim))
    return np.concatenate([rng.normal(loc=c, size=(per_cluster, dim)) for c in locations]).astype(np.float32)


# --- the pure logic -----------------------------------------------------------------------

@pytest.mark.parametrize("true_k", [1, 3, 5])
def test_bic_finds_the_number_of_clusters(true_k):
    result = fit_mixture(clusters(true_k, 120, 4), components=range(1, 8), pca_dim=None, seed=0)
    assert result.chosen_k == true_k
    assert result.mixture.components == true_k and min(result.bic_per_k, key=result.bic_per_k.get) == true_k
    assert result.samples == 120 * true_k and result.fit_seconds > 0


@pytest.mark.parametrize("covariance", ["full", "tied", "diag", "spherical"])
def test_scoring_is_scikit_learns_in_one_pass(covariance):
    features = clusters(3, 100, 6)
    mixture = fit_mixture(features, range(2, 5), covariance, pca_dim=4, seed=0).mixture
    pool = np.random.default_rng(1).normal(scale=20, size=(20_000, 6)).astype(np.float32)
    loglik, component = mixture.log_likelihood(pool)
    projected = mixture.projection.apply(pool)
    np.testing.assert_allclose(loglik, mixture.estimator.score_samples(projected), rtol=1e-10)
    np.testing.assert_array_equal(component, mixture.estimator.predict(projected))
    assert loglik.dtype == np.float64 and component.dtype == np.int32
    ids = np.arange(len(pool))
    chunks = [(ids[s:s + 7000], pool[s:s + 7000], ids[s:s + 7000] % 10) for s in range(0, len(pool), 7000)]
    seen = []
    scored = list(score_in_chunks(mixture, chunks, on_progress=seen.append))
    assert seen == [7000, 7000, 6000]
    np.testing.assert_array_equal(np.concatenate([s[1] for s in scored]), loglik)


def test_projection_standardises_then_projects():
    features = clusters(2, 100, 10) * np.linspace(1, 50, 10, dtype=np.float32)
    mixture = fit_mixture(features, [2], pca_dim=3, seed=0).mixture
    projection = mixture.projection
    standardised = (features - features.mean(0)) / features.std(0)
    np.testing.assert_allclose(projection.apply(features), standardised @ projection.components.T, atol=1e-4)
    raw = fit_mixture(features, [2], pca_dim=None, standardize=False, seed=0).mixture.projection
    assert raw.components is None and (raw.scale == 1).all() and raw.dim == 10


def test_refusal_rule():
    assert min_support("full", 32) == 66
    assert min_support("tied", 32) == 33
    assert min_support("diag", 32) == min_support("spherical", 32) == 10
    feasible, dropped = check_feasible(300, 64, range(2, 11), "full", 32)
    assert feasible == [2, 3, 4] and sorted(dropped) == [5, 6, 7, 8, 9, 10]
    assert "needs 330 samples" in dropped[5]
    with pytest.raises(UsageError, match="49 samples are fewer than the floor of 50"):
        check_feasible(49, 64, [2], "full", 8)
    with pytest.raises(UsageError, match=r"pca_dim 80 must lie in 1\.\.64"):   # the parameter, as the logic names it
        check_feasible(500, 64, [2], "full", 80)
    with pytest.raises(UsageError, match="pca_dim 60 needs more than 60 samples"):
        check_feasible(60, 64, [1], "diag", 60, min_samples=10)
    with pytest.raises(UsageError) as refused:
        check_feasible(100, 64, range(2, 11), "full", 32)
    message = str(refused.value)
    assert message.startswith("100 samples are too few for a full-covariance mixture in d=32 dims: K=2 needs 66")
    assert "--pca-dim 24 or less" in message and "--covariance diag" in message and "--components 1" in message
    assert "at least 132 samples" in message
    # every piece of advice works
    assert check_feasible(100, 64, range(2, 11), "full", 24)[0] == [2]
    assert check_feasible(100, 64, range(2, 11), "diag", 32)[0] == list(range(2, 11))
    assert check_feasible(100, 64, [1], "full", 32)[0] == [1]
    assert check_feasible(132, 64, range(2, 11), "full", 32)[0] == [2]


def test_mean_noise_is_seeded_and_scaled():
    features = clusters(2, 200, 4)
    clean = fit_mixture(features, [2], pca_dim=None, seed=0).mixture
    noisy = [fit_mixture(features, [2], pca_dim=None, seed=0, noise_scale=0.5).mixture for _ in range(2)]
    np.testing.assert_array_equal(noisy[0].means, noisy[1].means)
    shift = np.abs(noisy[0].means - clean.means) / np.sqrt(np.diagonal(clean.covariances, axis1=1, axis2=2))
    assert 0 < shift.max() < 3 * 0.5
    np.testing.assert_array_equal(noisy[0].covariances, clean.covariances)


# --- the command and its artifact ---------------------------------------------------------

def test_fit_gmm_end_to_end(gmm_file, tiny_model_file, tapvits):
    from tapvits_cli.artifacts.model import load_extractor

    read = read_gmm(gmm_file)
    mixture, info, artifact = read.mixture, read.info, read.artifact
    extractor = load_extractor(tiny_model_file)
    assert isinstance(mixture, Mixture) and mixture.dim == 8 and mixture.feature_dim == 24
    assert info.samples == 287 and info.extractor == extractor.fingerprint
    assert artifact.metadata["gmm.extractor_sha256"] == fingerprint_sha256(extractor.fingerprint)
    assert min(info.bic, key=info.bic.get) == mixture.components
    # n / K >= 18 for every K, but above K=5 some component holds fewer than 18 samples: rejected
    assert sorted(info.bic) == [2, 3, 4, 5]
    assert (mixture.weights * info.samples >= 18).all()
    assert info.fit_seconds > 0 and info.extract_seconds > 0
    assert info.privacy == {"min_samples": 50, "min_samples_per_component": 18, "noise_scale": 0.0,
                            "min_variance_ratio": 0.001, "min_distance_ratio": 0.1}
    header = artifact.header
    assert header.params["pca_dim"] == 8 and header.params["covariance"] == "full" and header.params["seed"] == 0
    assert header.params["components"] == list(range(2, 11))
    assert header.inputs["extractor"].name == "tiny.safetensors" and header.inputs["extractor"].kind == "model"
    assert header.inputs["data"].name == "private" and header.inputs["data"].kind == "dataset"

    assert tapvits("validate", gmm_file).stdout == f"{gmm_file}: ok (gmm v3)\n"
    document = tapvits("inspect", "--json", gmm_file).json()
    figures = document["figures"]
    assert (figures["components"], figures["dim"], figures["feature_dim"]) == (mixture.components, 8, 24)
    assert figures["samples"] == 287 and figures["covariance_type"] == "full" and figures["pca"] is True
    bic_table, components_table = document["tables"]
    assert [row[0] for row in bic_table["rows"]] == sorted(info.bic)
    assert [row[0] for row in bic_table["rows"] if row[2] == "*"] == [mixture.components]
    assert sum(row[1] for row in components_table["rows"]) == pytest.approx(1.0)
    assert all(row[2] >= 18 for row in components_table["rows"])  # effective support
    assert "BIC per K" in tapvits("inspect", gmm_file).stdout


def test_json_result_and_options(tmp_path, tapvits, tiny_model_file):
    out = tmp_path / "diag.safetensors"
    result = fit_cli(tapvits, tiny_model_file, out, "--json", "--no-pca", "--no-standardize",
                     "--covariance", "diag", "--components", "2,3")
    assert result.exit_code == 0, result.stderr
    document = result.json()
    assert document["kind"] == "gmm" and document["samples"] == 287 and set(document["bic"]) == {"2", "3"}
    read = read_gmm(out)
    mixture, artifact = read.mixture, read.artifact
    assert mixture.covariance_type == "diag" and mixture.projection.components is None
    assert "projection.components" not in artifact.tensors and (mixture.projection.scale == 1).all()
    default = tmp_path / "default.safetensors"
    assert fit_cli(tapvits, tiny_model_file, default).exit_code == 0
    assert read_gmm(default).mixture.dim == 23  # one dimension per 12 of the 287 samples, below the 24 features
    small = tmp_path / "small.safetensors"
    assert fit_cli(tapvits, tiny_model_file, small, "--covariance", "diag", data="digits:classes=0,1:sample=60").exit_code == 0
    assert read_gmm(small).mixture.dim == 5


def test_cli_refusals(tmp_path, tapvits, tiny_model_file):
    out = tmp_path / "g.safetensors"
    few = fit_cli(tapvits, tiny_model_file, out, "--no-pca", data="digits:classes=0,1:sample=60")
    assert few.exit_code == ExitCode.USAGE and few.stdout == ""
    assert "60 samples are too few for a full-covariance mixture in d=24 dims" in few.stderr
    assert "--pca-dim 14 or less" in few.stderr
    # Feasible on average (30 per component), but the fitted K=2 gives one component 22 samples
    uneven = fit_cli(tapvits, tiny_model_file, out, "--pca-dim", "14", data="digits:classes=0,1:sample=60")
    assert uneven.exit_code == ExitCode.USAGE and not out.exists()
    assert "breaks a per-component privacy guarantee" in uneven.stderr and "below 30" in uneven.stderr
    assert "--pca-dim 7" in uneven.stderr
    advice = fit_cli(tapvits, tiny_model_file, out, "--pca-dim", "7", data="digits:classes=0,1:sample=60")
    assert advice.exit_code == 0, advice.stderr
    floor = fit_cli(tapvits, tiny_model_file, out, data="digits:classes=0,1:sample=40")
    assert floor.exit_code == ExitCode.USAGE and "floor of 50" in floor.stderr
    both = fit_cli(tapvits, tiny_model_file, out, "--pca-dim", "8", "--no-pca")
    assert both.exit_code == ExitCode.USAGE and "exclusive" in both.stderr
    bad_range = fit_cli(tapvits, tiny_model_file, out, "--components", "5-2")
    assert bad_range.exit_code == ExitCode.USAGE
    missing = fit_cli(tapvits, tmp_path / "nope.safetensors", out)
    assert missing.exit_code == ExitCode.USAGE and "neither a model artifact file" in missing.stderr


def test_same_seed_same_file_content(tmp_path, tapvits, tiny_model_file):
    paths = [tmp_path / f"{name}.safetensors" for name in "ab"]
    for path in paths:
        assert fit_cli(tapvits, tiny_model_file, path, "--pca-dim", "8", "--seed", "3").exit_code == 0
    first, second = (load_file(str(p)) for p in paths)
    assert first.keys() == second.keys()
    for name in first:
        assert (first[name] == second[name]).all(), name
    assert read_gmm(paths[0]).mixture.components == read_gmm(paths[1]).mixture.components


def rewrite(src, dst, tensors=None, drop=(), **metadata):
    """Copy a gmm artifact with tensors replaced or dropped and metadata keys changed (None deletes).

    The tensor hash is recomputed, as a producer with a bug would: the content rules must catch it.
    """
    from tapvits_cli.artifacts.digests import tensors_sha256

    kept = {name: t for name, t in {**load_file(str(src)), **(tensors or {})}.items() if name not in drop}
    meta = {**open_file(src).metadata, "gmm.tensors_sha256": tensors_sha256(kept)}
    for key, value in metadata.items():
        key = key.replace("__", ".")
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    save_file(kept, str(dst), metadata=meta)
    return dst


def _all_but_first(tensor, value):
    changed = tensor.clone()
    changed[1:] = value
    return changed


def _collapse_first(covariances):
    """Component 0 squeezed onto the regulariser, as EM does around a single sample (full covariances)."""
    import torch
    from sklearn.mixture._gaussian_mixture import _compute_precision_cholesky

    collapsed = covariances.clone()
    collapsed[0] = torch.from_numpy(1e-6 * np.eye(collapsed.shape[-1]))
    cholesky = torch.from_numpy(_compute_precision_cholesky(collapsed.numpy(), "full"))
    return {"covariances": collapsed, "precisions_cholesky": cholesky}


def test_corrupted_gmm_is_rejected(gmm_file, tmp_path, tapvits):
    import torch

    tensors = load_file(str(gmm_file))
    k = tensors["weights"].shape[0]
    fingerprint = json.loads(open_file(gmm_file).metadata["gmm.extractor"])
    cases = {
        "sum to 1": dict(tensors={"weights": torch.full((k,), 0.9, dtype=torch.float64)}),
        "not positive definite": dict(tensors={"covariances": -tensors["covariances"]}),
        "precisions_cholesky does not match": dict(tensors={"precisions_cholesky": tensors["precisions_cholesky"] * 1.01}),
        "'means' must be F64": dict(tensors={"means": tensors["means"].float()}),
        "'projection.mean' is missing": dict(drop=["projection.mean"]),
        "does not match the hash of 'gmm.extractor'": dict(gmm__extractor=json.dumps({**fingerprint, "weights_sha256": "0" * 64})),
        "not the lowest-BIC entry": dict(gmm__bic=json.dumps({str(k): 1.0, "1": 0.0})),
        "'gmm.samples' is missing": dict(gmm__samples=None),
        "effective support": dict(gmm__samples="20"),  # too few samples behind each component
        "has a variance": dict(tensors=_collapse_first(tensors["covariances"])),
        "privacy.dp' must hold": dict(gmm__privacy=json.dumps({"min_samples": 50, "noise_scale": 0, "dp": {"epsilon": 1}})),
        "'gmm.unit_norm' must be": dict(gmm__unit_norm="yes"),
        # finite values whose densities overflow: every pool sample would score −inf or NaN
        "out of range": dict(tensors={"means": tensors["means"] * 0 + 1e200}),
        "out of range ": dict(tensors={"projection.scale": tensors["projection.scale"] * 0 + 1e-310}),
        # only features 1.. blown up: e0 alone scores finite, real features overflow (found by a review)
        "out of range  ": dict(tensors={"projection.scale": _all_but_first(tensors["projection.scale"], 1e-200),
                                        "projection.mean": _all_but_first(tensors["projection.mean"], 0.0)}),
        "must be an integer >= 1, got '³'": dict(gmm__components="³"),   # isdigit() says yes, int() says no
        "must be an integer >= 1, got '٩٣'": dict(gmm__samples="٩٣"),    # int() would read 93
        # a review: weights × samples overflowed a float (exit 1), and K = 200,000 made select allocate 2 GiB
        "'gmm.samples' must be at most 9,223,372,036,854,775,807, got '1000": dict(gmm__samples="1" + "0" * 400),
        "'gmm.components' must be at most 1,024, got '200000'": dict(gmm__components="200000"),
        "'gmm.feature_dim' must be at most 16,384, got '16385'": dict(gmm__feature_dim="16385"),
        "nested too deeply": dict(tapvits__inputs="[" * 100000 + "]" * 100000),
        "'gmm.bic' is not valid JSON": dict(gmm__bic="[" * 100000 + "]" * 100000),
        "'gmm.bic' is not valid JSON (NaN is not a JSON number)": dict(gmm__bic=json.dumps({str(k): float("nan")})),
        "'gmm.bic' must map each K ": dict(gmm__bic=json.dumps({str(k): True})),
        "is not a decimal integer": dict(tapvits__version=" 1 "),
    }
    for expected, change in cases.items():
        broken = rewrite(gmm_file, tmp_path / "broken.safetensors", **change)
        result = tapvits("validate", broken)
        assert result.exit_code == ExitCode.INVALID_ARTIFACT and expected.strip() in result.stderr, (expected, result.stderr)
        assert result.stderr.count("\n") == 1, (expected, result.stderr)   # one line: no warnings either
        with pytest.raises(Exception, match="broken.safetensors"):
            read_gmm(broken)
    flipped = tmp_path / "flipped.safetensors"
    data = bytearray(gmm_file.read_bytes())
    data[-20] ^= 0x01  # the lowest bit of one number: structure intact, content corrupted
    flipped.write_bytes(bytes(data))
    result = tapvits("validate", flipped)
    assert result.exit_code == ExitCode.INVALID_ARTIFACT and "gmm.tensors_sha256" in result.stderr
    newer = rewrite(gmm_file, tmp_path / "newer.safetensors", tapvits__version="4")
    assert tapvits("validate", newer).exit_code == ExitCode.INCOMPATIBLE
    from tapvits_cli.artifacts.digests import tensors_sha256   # v1 and v2 hashed tensors by the legacy rule

    legacy = tensors_sha256(load_file(str(gmm_file)), "legacy")
    older = rewrite(gmm_file, tmp_path / "older.safetensors", tapvits__version="2", gmm__tensors_sha256=legacy)
    assert tapvits("validate", older).stdout == f"{older}: ok (gmm v2)\n"
    mislabelled = rewrite(gmm_file, tmp_path / "mislabelled.safetensors", gmm__tensors_sha256=legacy)
    assert tapvits("validate", mislabelled).exit_code == ExitCode.INVALID_ARTIFACT
    extended = rewrite(gmm_file, tmp_path / "extended.safetensors", gmm__future="x")
    assert tapvits("validate", extended).exit_code == 0


def test_write_gmm_round_trip(tmp_path):
    features = clusters(3, 100, 6)
    for covariance in ("full", "tied", "diag", "spherical"):
        result = fit_mixture(features, range(2, 5), covariance, pca_dim=4, seed=0)
        info = GmmInfo(samples=result.samples, bic=result.bic_per_k, fit_seconds=result.fit_seconds,
                       extract_seconds=0.0, extractor={"architecture": "synthetic", "feature_dim": 6},
                       privacy={"min_samples": 50, "noise_scale": 0.0})
        path = write_gmm(tmp_path / f"{covariance}.safetensors", result.mixture, info, {"seed": 0})
        read = read_gmm(path)
        mixture, read_info = read.mixture, read.info
        assert read_info.bic == result.bic_per_k and read_info.extractor_sha256 == info.extractor_sha256
        np.testing.assert_array_equal(mixture.log_likelihood(features)[0], result.mixture.log_likelihood(features)[0])


# --- privacy --------------------------------------------------------------------------------

def windows(rows: np.ndarray, width: int = 4) -> set[bytes]:
    """Every run of ``width`` consecutive values of every row, as raw bytes."""
    rows = np.ascontiguousarray(rows)
    step = rows.itemsize
    return {row.tobytes()[i * step:(i + width) * step] for row in rows for i in range(rows.shape[1] - width + 1)}


@pytest.mark.parametrize("projection", [["--pca-dim", "8"], ["--no-pca"]])
def test_no_private_sample_can_be_read_back(tmp_path, tapvits, tiny_model_file, projection):
    from sklearn.datasets import load_digits

    from tapvits_cli.artifacts.model import load_extractor
    from tapvits_cli.data import open_dataset
    from tapvits_cli.models.extract import extract_features

    digits = load_digits()
    private = digits.images[np.isin(digits.target, [3, 8])][:200].astype(np.uint8)
    labels = digits.target[np.isin(digits.target, [3, 8])][:200]
    source = tmp_path / "secret-device-photos.npz"
    np.savez(source, x=private, y=labels)
    out = tmp_path / "upload.safetensors"
    result = fit_cli(tapvits, tiny_model_file, out, *projection, data=str(source))
    assert result.exit_code == 0, result.stderr
    blob = out.read_bytes()
    read = read_gmm(out)
    mixture, info, artifact = read.mixture, read.info, read.artifact

    dataset = open_dataset(str(source))
    features = np.concatenate([f for _, f, _ in extract_features(load_extractor(tiny_model_file), dataset)])
    projected = mixture.projection.apply(features)
    images = dataset.images(np.arange(len(dataset)))
    for image, raw in zip(images, private):
        for encoding in (image.astype(np.float32), image.astype(np.float64), raw):
            assert encoding.tobytes() not in blob
    for vectors in (features, projected):
        for encoded in windows(vectors.astype(np.float32)) | windows(vectors.astype(np.float64)):
            assert encoded not in blob
    for encoded in (labels.astype(np.int64), labels.astype(np.int32), labels.astype(np.uint8), dataset.ids):
        assert encoded.tobytes() not in blob
    assert json.dumps(labels.tolist()).encode() not in blob and b"secret-device-photos" not in blob
    assert all(len(dataset) not in info_.shape for info_ in artifact.tensors.values())  # nothing per sample
    assert info.samples == len(dataset)

    # With the refusal rule in force no component sits on a private sample.
    to_means = np.linalg.norm(projected[:, None] - mixture.means[None], axis=-1).min()
    between = np.linalg.norm(projected[:, None] - projected[None], axis=-1)
    np.fill_diagonal(between, np.inf)
    assert to_means > 0.5 * np.median(between.min(axis=1))


# --- per-component guarantees ---------------------------------------------------------------

def _device_sets():
    """Small device sets of real images: digits and Fashion-MNIST pixels, a few classes each."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    sets = [digits.data[np.isin(digits.target, classes)][:size]
            for classes, size in (([0, 1, 2, 3], 74), ([7, 8, 9], 54), ([4, 5], 120), ([1, 7], 300))]
    from tapvits_cli.data import open_dataset
    from tapvits_cli.errors import DataUnavailableError

    try:  # .ci/run installs Fashion-MNIST; a bare checkout may lack it
        fashion = open_dataset("fashion-mnist:split=test:classes=0,6:sample=200")
    except DataUnavailableError:
        return sets
    return sets + [fashion.images(np.arange(len(fashion))).reshape(len(fashion), -1).astype(np.float64)]


@pytest.mark.parametrize("covariance", ["full", "tied", "diag", "spherical"])
def test_every_written_component_keeps_the_guarantees(covariance):
    from tapvits_cli.gmm.fit import default_pca_dim
    from tapvits_cli.gmm.privacy import audit_against_data, median_neighbour_distance
    from tapvits_cli.payloads.guarantees import MIN_DISTANCE_RATIO, MIN_VARIANCE_RATIO

    written = 0
    for features in _device_sets():
        for seed, components in ((0, range(2, 11)), (1, range(1, 6)), (2, [3, 6, 9])):
            dim = default_pca_dim(len(features), features.shape[1])
            try:
                mixture = fit_mixture(features, components, covariance, dim, seed=seed, min_samples=40).mixture
            except UsageError as refusal:
                assert "privacy guarantee" in str(refusal) or "too few" in str(refusal)
                continue
            written += 1
            projected = mixture.projection.apply(features)
            audit = audit_against_data(mixture, len(features), projected, median_neighbour_distance(projected))
            support = min_support(covariance, mixture.dim)
            assert (audit.effective_support >= support).all() and (audit.assigned >= support).all()
            assert (audit.variance_ratio >= MIN_VARIANCE_RATIO).all()
            assert (audit.distance_ratio >= MIN_DISTANCE_RATIO).all()
            assert audit.violations(support) == []
    assert written >= 8


def test_a_component_on_one_sample_is_rejected():
    """EM left alone puts a component on an isolated sample; the search must reject that K."""
    from sklearn.mixture import GaussianMixture

    from tapvits_cli.payloads.guarantees import audit_parameters

    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(size=(60, 3)), rng.normal(loc=8.0, size=(60, 3)), [[40.0, -40.0, 40.0]]])
    raw = GaussianMixture(3, covariance_type="diag", random_state=0).fit(features)
    assert raw.weights_.min() * len(features) < 1.5  # the failure this guards against is real here
    result = fit_mixture(features, [2, 3], "diag", pca_dim=None, standardize=False, seed=0)
    assert 3 in result.dropped and "rejected after fitting" in result.dropped[3]
    assert result.chosen_k == 2 and audit_parameters(result.mixture, len(features)).violations(10) == []
    with pytest.raises(UsageError, match="breaks a per-component privacy guarantee"):
        fit_mixture(features, [3], "diag", pca_dim=None, standardize=False, seed=0)


def test_membership_auc_and_distance_ratios():
    from tapvits_cli.gmm.privacy import distance_ratios, median_neighbour_distance, membership_auc

    assert membership_auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert membership_auc(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.5
    grid = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0]])  # one duplicate, skipped
    assert median_neighbour_distance(grid) == 1.0
    np.testing.assert_allclose(distance_ratios(np.array([[1.0, 0.0], [0.5, 0.5]]), grid, 1.0), [0.0, np.sqrt(0.5)])
    with pytest.raises(ValueError, match="same features"):
        median_neighbour_distance(np.ones((5, 3)))


# --- audit-gmm ------------------------------------------------------------------------------

def test_audit_gmm_reports_support_distances_and_membership(gmm_file, tiny_model_file, tmp_path, tapvits):
    result = tapvits("audit-gmm", gmm_file, "--private", PRIVATE, "--extractor", tiny_model_file,
                     "--held-out", "digits:split=test:classes=0,1", "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json()
    read = read_gmm(gmm_file)
    mixture, info = read.mixture, read.info
    assert report["ok"] is True and report["violations"] == [] and report["min_support"] == 18
    assert len(report["components"]) == mixture.components
    assert sum(row["assigned"] for row in report["components"]) == info.samples
    assert all(row["distance_ratio"] >= 0.1 and row["effective_support"] >= 18 for row in report["components"])
    assert 0.0 <= report["membership_auc"] <= 1.0 and report["held_out_samples"] == 73
    gate = tapvits("audit-gmm", gmm_file, "--private", PRIVATE, "--extractor", tiny_model_file,
                   "--held-out", "digits:split=test:classes=0,1", "--max-auc", "0.5")
    assert gate.exit_code == ExitCode.BELOW_THRESHOLD and "membership-inference AUC" in gate.stderr
    other = tapvits("audit-gmm", gmm_file, "--private", "digits:classes=2,3", "--extractor", tiny_model_file)
    assert other.exit_code == ExitCode.INCOMPATIBLE and "not fitted on" in other.stderr


def test_audit_gmm_fails_a_mean_placed_on_a_private_sample(gmm_file, tiny_model_file, tmp_path, tapvits):
    """A producer that skipped the guarantees: every file-level check passes, the audit does not."""
    from dataclasses import replace

    from tapvits_cli.artifacts.model import load_extractor
    from tapvits_cli.data import open_dataset
    from tapvits_cli.models.extract import extract_features

    read = read_gmm(gmm_file)
    mixture, info, artifact = read.mixture, read.info, read.artifact
    features = np.concatenate([f for _, f, _ in extract_features(load_extractor(tiny_model_file),
                                                                  open_dataset(PRIVATE))])
    means = mixture.means.copy()
    means[0] = mixture.projection.apply(features[:1])[0]  # component 0's mean is sample 0
    leaky = write_gmm(tmp_path / "leaky.safetensors", replace(mixture, means=means), info, artifact.header.params,
                      artifact.header.inputs)
    assert tapvits("validate", leaky).exit_code == 0  # nothing in the file alone shows it
    result = tapvits("audit-gmm", leaky, "--private", PRIVATE, "--extractor", tiny_model_file, "--json")
    assert result.exit_code == ExitCode.BELOW_THRESHOLD and "leaky.safetensors: component" in result.stderr
    report = result.json()
    assert report["ok"] is False and report["components"][0]["distance_ratio"] < 1e-6
    assert any(line.startswith("component 0's mean lies") for line in report["violations"])


# --- differential privacy -------------------------------------------------------------------

def test_zcdp_accounting():
    from tapvits_cli.payloads.zcdp import epsilon_for, gaussian_sigma, rho_for

    for epsilon, delta in ((1.0, 1e-5), (3.0, 1e-6), (10.0, 1e-5)):
        rho = rho_for(epsilon, delta)
        assert epsilon_for(rho, delta) == pytest.approx(epsilon, rel=1e-12)
        assert epsilon_for(rho * 1.01, delta) > epsilon  # the largest rho that stays within epsilon
    assert rho_for(1.0, 1e-5) == pytest.approx(0.020820, abs=1e-6)   # (sqrt(ln 1e5 + 1) - sqrt(ln 1e5))^2
    assert gaussian_sigma(2.0, 0.5) == pytest.approx(2.0) and gaussian_sigma(1.0, 2.0) == pytest.approx(0.5)
    for epsilon, delta in ((0.0, 1e-5), (float("inf"), 1e-5), (1.0, 0.0), (1.0, 1.0)):
        with pytest.raises(UsageError):
            rho_for(epsilon, delta)


def test_released_noise_matches_the_mechanism():
    """The noisy mean released for the projection has the standard deviation the formula gives."""
    from tapvits_cli.gmm.dp import private_projection
    from tapvits_cli.payloads.zcdp import gaussian_sigma

    rng = np.random.default_rng(0)
    unit = rng.normal(size=(50, 6))
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    releases = np.stack([private_projection(unit, 3, 0.02, 0.1, np.random.default_rng(i))[0].mean for i in range(600)])
    empirical = (releases - unit.mean(axis=0)).std(axis=0) * len(unit)
    np.testing.assert_allclose(empirical, gaussian_sigma(2.0, 0.02), rtol=0.1)   # 2 / sqrt(0.04) = 10
    np.testing.assert_allclose(releases.mean(axis=0), unit.mean(axis=0), atol=4 * 10 / 50 / np.sqrt(600))


def test_private_fit_finds_separated_clusters_and_records_its_budget():
    from sklearn.metrics import adjusted_rand_score

    from tapvits_cli.gmm.dp import BUDGET_SHARES, fit_private_mixture
    from tapvits_cli.payloads.zcdp import gaussian_sigma

    features = clusters(3, 1000, 10, seed=1) + 100.0  # unit-normalising keeps the clusters apart
    truth = np.repeat(np.arange(3), 1000)
    fit = fit_private_mixture(features, 3, "diag", dim=4, epsilon=10.0, seed=0, min_component_support=10)
    assert fit.mixture.projection.unit_norm and fit.epsilon == pytest.approx(10.0)
    assert adjusted_rand_score(truth, fit.mixture.log_likelihood(features)[1]) > 0.95
    release_rho = fit.rho * BUDGET_SHARES["em"] / (3 * fit.iterations)
    assert fit.sigmas["em_sums"] == pytest.approx(gaussian_sigma(2 * fit.clip_norm, release_rho))
    assert fit.sigmas["em_second_moments"] == pytest.approx(gaussian_sigma(2 * fit.clip_norm ** 2, release_rho))
    # the simplex start can put two vertices by one cluster: most noise draws, not all, keep them apart
    found = [adjusted_rand_score(truth, fit_private_mixture(features, 3, covariance, dim=4, epsilon=10.0, seed=seed,
                                                            min_component_support=10).mixture.log_likelihood(features)[1])
             > 0.95 for covariance in ("diag", "full") for seed in range(8)]
    assert sum(found[:8]) >= 6 and sum(found[8:]) >= 6, found
    noisy = fit_private_mixture(features, 3, "diag", dim=4, epsilon=0.05, seed=0)
    assert adjusted_rand_score(truth, noisy.mixture.log_likelihood(features)[1]) < 0.95  # privacy costs fidelity


def test_private_fit_is_the_same_whichever_signs_lapack_gives_the_eigenvectors(monkeypatch):
    # CPUs differ in the sign LAPACK returns for an eigenvector; the start is laid along them
    from tapvits_cli.gmm import dp

    features = clusters(3, 300, 10, seed=1) + 100.0
    first = dp.fit_private_mixture(features, 3, "full", dim=4, epsilon=10.0, seed=0)
    eigh = np.linalg.eigh
    monkeypatch.setattr(dp.np.linalg, "eigh", lambda matrix: (lambda values, vectors: (values, -vectors))(*eigh(matrix)))
    flipped = dp.fit_private_mixture(features, 3, "full", dim=4, epsilon=10.0, seed=0)
    np.testing.assert_allclose(flipped.mixture.projection.components, first.mixture.projection.components)
    np.testing.assert_allclose(flipped.mixture.means, first.mixture.means, atol=1e-9)


def test_fit_gmm_with_differential_privacy(tmp_path, tapvits, tiny_model_file):
    out = tmp_path / "dp.safetensors"
    result = fit_cli(tapvits, tiny_model_file, out, "--dp-epsilon", "3", "--components", "2", "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json()["dp"]["epsilon"] == pytest.approx(3.0) and result.json()["bic"] == {}
    read = read_gmm(out)
    mixture, info, artifact = read.mixture, read.info, read.artifact
    assert mixture.projection.unit_norm and artifact.metadata["gmm.unit_norm"] == "true"
    assert mixture.covariance_type == "diag" and info.bic == {}
    assert info.privacy["dp"]["accounting"] == "zCDP" and info.privacy["dp"]["delta"] == 1e-5
    assert artifact.header.params["dp_epsilon"] == 3.0
    assert tapvits("validate", out).exit_code == 0
    assert "differentially private" in tapvits("inspect", out).stdout
    refusals = {
        ("--components", "2-4"): (ExitCode.USAGE, "fits one K"),
        ("--covariance", "tied"): (ExitCode.NOT_IMPLEMENTED, "supports --covariance diag or full"),
        ("--noise-scale", "0.5"): (ExitCode.USAGE, "exclusive"),
        ("--dp-delta", "2"): (ExitCode.USAGE, "--dp-delta"),
    }
    for extra, (code, message) in refusals.items():
        refused = fit_cli(tapvits, tiny_model_file, tmp_path / "refused.safetensors", "--dp-epsilon", "3", *extra)
        assert refused.exit_code == code and message in refused.stderr, (extra, refused.stderr)
        assert not (tmp_path / "refused.safetensors").exists()
