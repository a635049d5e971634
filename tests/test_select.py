"""`tapvits select` and the metric-set artifact: strategies, nesting, streaming, fingerprints, precision."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from tapvits_cli.artifacts.metric_set import read_metric_set
from tapvits_cli.errors import ExitCode, UsageError
from tapvits_cli.payloads.coverage import class_coverage, component_coverage, selection_coverage
from tapvits_cli.selection import StreamingSelection, proportional_quotas, select
from tapvits_cli.vocabulary import RATIO_STRATEGIES, SELECTION_STRATEGIES as STRATEGIES

POOL = "digits:split=test"  # 364 public images of all ten digits
DEVICE = "digits:classes=0,1"  # the device's private training images: two digits


def scores(n: int = 5000, components: int = 4, seed: int = 0):
    """Log-likelihoods with many exact ties (one decimal), and components."""
    rng = np.random.default_rng(seed)
    return np.round(rng.normal(size=n), 1), rng.integers(0, components, n).astype(np.int32)


def class_prior_inputs(strategy: str, n: int = 5000) -> dict:
    """The class-prior strategy's labels and class shares (seeded); nothing for the others."""
    if strategy != "class-prior":
        return {}
    return {"labels": np.random.default_rng(5).integers(0, 5, n), "class_shares": [0.4, 0.0, 0.3, 0.2, 0.1]}


def in_order(loglik: np.ndarray) -> bool:
    return bool((np.diff(loglik) <= 0).all())


# --- pure strategies ------------------------------------------------------------------------

def test_topk_is_a_full_sort_with_ties_broken_by_position():
    loglik, component = scores()
    expected = np.lexsort((np.arange(len(loglik)), -loglik))[:640]
    for chunk_rows in (None, 1, 7, 640, 999):
        np.testing.assert_array_equal(select(loglik, component, [0.25] * 4, 64, 640, "topk", chunk_rows=chunk_rows),
                                      expected)


def ratio_scores(loglik: np.ndarray, seed: int = 1) -> np.ndarray:
    """A density-ratio-like score with ties of its own, not monotone in the log-likelihood."""
    return np.round(loglik - np.random.default_rng(seed).normal(size=len(loglik)), 1)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_streaming_in_chunks_changes_nothing(strategy):
    loglik, component = scores()
    score = ratio_scores(loglik) if strategy in RATIO_STRATEGIES else None
    weights = [0.5, 0.3, 0.15, 0.05]
    whole = select(loglik, component, weights, 64, 640, strategy, seed=3, score=score, **class_prior_inputs(strategy))
    for chunk_rows in (1, 13, 1000):
        np.testing.assert_array_equal(select(loglik, component, weights, 64, 640, strategy, seed=3,
                                             chunk_rows=chunk_rows, score=score, **class_prior_inputs(strategy)),
                                      whole)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_metric_set_is_the_head_of_the_finetuning_set(strategy):
    loglik, component = scores()
    score = ratio_scores(loglik) if strategy in RATIO_STRATEGIES else loglik
    chosen = select(loglik, component, [0.5, 0.3, 0.15, 0.05], 64, 640, strategy, seed=1,
                    score=score if strategy in RATIO_STRATEGIES else None, **class_prior_inputs(strategy))
    assert len(chosen) == 640 == len(np.unique(chosen))
    assert in_order(loglik[chosen[:64]]) and in_order(loglik[chosen[64:]])
    if strategy != "random":  # the metric set is the best part of the fine-tuning set, by the strategy's score
        assert score[chosen[:64]].min() >= np.median(score[chosen])


def test_ratio_ranks_by_the_score_not_the_likelihood():
    loglik, component = scores()
    score = ratio_scores(loglik)
    chosen = select(loglik, component, [0.25] * 4, 64, 640, "ratio", score=score)
    expected = np.lexsort((np.arange(len(score)), -score))
    assert set(chosen) == set(expected[:640]) and set(chosen[:64]) == set(expected[:64])
    assert set(chosen) != set(select(loglik, component, [0.25] * 4, 64, 640, "topk"))
    # ratio-stratified: the quotas of stratified, filled by the score
    weights = [0.5, 0.3, 0.15, 0.05]
    chosen = select(loglik, component, weights, 64, 640, "ratio-stratified", score=score)
    quotas = proportional_quotas(weights, 640, np.bincount(component, minlength=4))
    np.testing.assert_array_equal(np.bincount(component[chosen], minlength=4), quotas)
    for c in range(4):
        members = np.flatnonzero(component == c)
        best = members[np.lexsort((members, -score[members]))[:quotas[c]]]
        assert set(chosen[component[chosen] == c]) == set(best)
    with pytest.raises(ValueError, match="density ratio: pass score"):
        select(loglik, component, weights, 64, 640, "ratio")


def test_stratified_quotas_follow_the_weights_and_the_supply():
    rng = np.random.default_rng(0)
    component = rng.choice(3, 3000, p=[0.49, 0.5, 0.01]).astype(np.int32)  # component 2 is scarce
    loglik = rng.normal(size=3000) + 3.0 * (component == 0)               # component 0 dominates topk
    weights = [0.4, 0.3, 0.3]
    chosen = select(loglik, component, weights, 100, 1000, "stratified")
    supply = np.bincount(component, minlength=3)
    finetune_quota = proportional_quotas(weights, 1000, supply)
    metric_quota = proportional_quotas(weights, 100, finetune_quota)
    np.testing.assert_array_equal(np.bincount(component[chosen], minlength=3), finetune_quota)
    np.testing.assert_array_equal(np.bincount(component[chosen[:100]], minlength=3), metric_quota)
    assert finetune_quota[2] == supply[2] < 300  # all of the scarce component, the rest shared 4:3
    assert abs(finetune_quota[0] / finetune_quota[1] - 4 / 3) < 0.01
    for c in range(3):  # within a component: its most likely samples
        members = np.flatnonzero(component == c)
        best = members[np.argsort(-loglik[members], kind="stable")[:finetune_quota[c]]]
        assert set(chosen[component[chosen] == c]) == set(best)
    topk = select(loglik, component, weights, 100, 1000, "topk")
    assert np.bincount(component[topk], minlength=3)[0] > 900  # what stratification prevents


def test_proportional_quotas():
    np.testing.assert_array_equal(proportional_quotas([0.5, 0.3, 0.15, 0.05], 100, [10, 100, 100, 100]), [10, 54, 27, 9])
    np.testing.assert_array_equal(proportional_quotas([0.5, 0.5], 3, [5, 5]), [2, 1])       # remainder tie: lower index
    np.testing.assert_array_equal(proportional_quotas([1, 0, 0], 5, [2, 2, 2]), [2, 2, 1])  # weightless ones fill in
    np.testing.assert_array_equal(proportional_quotas([0.2, 0.8], 0, [3, 3]), [0, 0])
    with pytest.raises(ValueError):
        proportional_quotas([0.5, 0.5], 7, [3, 3])
    rng = np.random.default_rng(0)
    for _ in range(300):
        k = rng.integers(1, 12)
        weights = rng.dirichlet(np.ones(k) * 0.3)
        supply = rng.integers(0, 200, k)
        total = int(rng.integers(0, supply.sum() + 1))
        quotas = proportional_quotas(weights, total, supply)
        assert quotas.sum() == total and (quotas >= 0).all() and (quotas <= supply).all()
        nested = proportional_quotas(weights, int(rng.integers(0, total + 1)), quotas)
        assert (nested <= quotas).all()


def test_random_is_seeded_and_blind_to_likelihood():
    loglik, component = scores()
    first, again, other = (select(loglik, component, [0.25] * 4, 64, 500, "random", seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(first, again)
    assert set(first) != set(other)
    top = set(select(loglik, component, [0.25] * 4, 64, 500, "topk"))
    assert len(top & set(first)) < 0.3 * 500  # about 10% expected by chance


# --- coverage ---------------------------------------------------------------------------------

def test_component_coverage_on_constructed_selections():
    weights = [0.5, 0.3, 0.2]
    follows = component_coverage(np.repeat([0, 1, 2], [50, 30, 20]), weights)
    assert follows["coverage"] == pytest.approx(1.0) and follows["worst_ratio"] == pytest.approx(1.0)
    assert follows["missing"] == 0 and follows["shares"] == pytest.approx(weights)
    one = component_coverage(np.zeros(100, dtype=np.int32), weights)   # the whole set in component 0
    assert one["coverage"] == pytest.approx(0.5) and one["worst_ratio"] == 0.0 and one["missing"] == 2
    smallest = component_coverage(np.full(100, 2), weights)
    assert smallest["coverage"] == pytest.approx(0.2)                   # poor: the weight of what it took
    skewed = component_coverage(np.repeat([0, 1, 2], [80, 15, 5]), weights)
    assert skewed["coverage"] == pytest.approx(0.5 + 0.15 + 0.05) and skewed["worst_ratio"] == pytest.approx(0.25)
    assert one["coverage"] < skewed["coverage"] < follows["coverage"]
    both = selection_coverage(np.repeat([0, 1, 2], [10, 45, 45]), weights, metric_size=10)
    assert both["metric"]["coverage"] == pytest.approx(0.5) and both["finetune"]["coverage"] == pytest.approx(0.6)
    assert both["weights"] == weights
    with pytest.raises(ValueError, match="components must lie"):
        component_coverage(np.array([3]), weights)
    with pytest.raises(ValueError, match="distribution"):
        component_coverage(np.array([0]), [0.5, 0.2])


def test_class_coverage_sees_what_precision_cannot():
    private = np.repeat([2, 4, 6], [500, 300, 200])
    one_class = np.full(640, 2)                          # precision 1.0, two classes missing
    assert class_coverage(one_class, private) == {"class_recall": pytest.approx(1 / 3), "min_class_ratio": 0.0}
    matching = np.repeat([2, 4, 6, 9], [250, 150, 100, 140])   # device shares, plus other classes
    figures = class_coverage(matching, private)
    assert figures["class_recall"] == 1.0 and figures["min_class_ratio"] == pytest.approx(1.0)
    thin = np.repeat([2, 4, 6], [600, 390, 10])          # class 6: 1% of the set, 20% of the device
    assert class_coverage(thin, private)["min_class_ratio"] == pytest.approx(0.01 / 0.2)


def dense_and_broad_pool(seed: int = 0):
    """A 4-D public pool of five classes; the device holds class 0 (dense) and class 1 (broad)."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0, 0, 0, 0], [6, 0, 0, 0], [0, 6, 0, 0], [0, 0, 6, 0], [6, 6, 6, 0]], dtype=float)
    spread = np.array([0.15, 1.0, 0.6, 0.6, 0.6])
    labels = np.repeat(np.arange(5), 1500)
    features = centres[labels] + rng.normal(size=(len(labels), 4)) * spread[labels, None]
    private = np.repeat([0, 1], 300)
    private_features = centres[private] + rng.normal(size=(600, 4)) * spread[private, None]
    return features, labels, private_features


def device_mixture(private_features: np.ndarray, components: int, pca_dim: int | None = None):
    """A device's mixture built directly (the device side is not under test here)."""
    from sklearn.mixture import GaussianMixture

    from tapvits_cli.payloads.mixture import Mixture, Projection

    mean = private_features.mean(axis=0)
    axes = None if pca_dim is None else np.linalg.svd(private_features - mean, full_matrices=False)[2][:pca_dim]
    projection = Projection(mean, np.ones(private_features.shape[1]), axes)
    model = GaussianMixture(components, random_state=0).fit(projection.apply(private_features))
    return Mixture(model.weights_, model.means_, model.covariances_, "full", projection)


def test_density_ratio_covers_a_dense_and_a_broad_class():
    """Top-k by likelihood fills the set with the dense class; the density ratio against a
    public-pool mixture takes both of the device's classes, and still almost nothing else."""
    from tapvits_cli.selection.density_ratio import fit_public_mixture, sample_positions

    features, labels, private_features = dense_and_broad_pool()
    device = device_mixture(private_features, 2)
    positions = sample_positions(len(features), 5000, seed=0)
    public = fit_public_mixture(features[positions], device, components=8, seed=0)
    assert public.samples == 5000 and public.mixture.components == 8
    loglik, component = device.log_likelihood(features)
    ratio = loglik - public.mixture.log_likelihood(features)[0]
    sets = {strategy: select(loglik, component, device.weights, 200, 1200, strategy,
                             score=ratio if strategy in RATIO_STRATEGIES else None)
            for strategy in ("topk", "stratified", "ratio", "ratio-stratified")}
    share = {strategy: np.bincount(labels[chosen], minlength=5) / len(chosen) for strategy, chosen in sets.items()}
    assert share["topk"][1] < 0.05                  # the broad class is all but missing
    for strategy in ("ratio", "ratio-stratified"):
        assert share[strategy][0] >= 0.3 and share[strategy][1] >= 0.3, (strategy, share[strategy])
        assert share[strategy][:2].sum() >= 0.95      # precision stays high
        metric = np.bincount(labels[sets[strategy][:200]], minlength=5) / 200
        assert metric[0] >= 0.2 and metric[1] >= 0.2   # and so does the metric set
        coverage = selection_coverage(component[sets[strategy]], device.weights, 200)
        assert coverage["finetune"]["coverage"] >= 0.8, coverage
    assert selection_coverage(component[sets["topk"]], device.weights, 200)["finetune"]["coverage"] <= 0.6


def test_public_mixture_uses_the_device_projection_and_a_feasible_k():
    from tapvits_cli.selection.density_ratio import fit_public_mixture, rows_at, sample_positions

    features, _, private_features = dense_and_broad_pool()
    device = device_mixture(private_features, 2, pca_dim=3)
    small = fit_public_mixture(features[:100], device, components=20)
    assert small.mixture.projection is device.projection and small.mixture.dim == 3
    assert small.mixture.components == 100 // (2 * (3 + 1))        # lowered to what 100 rows support
    positions = sample_positions(len(features), 300, seed=4)
    assert len(positions) == 300 and (np.diff(positions) > 0).all()
    np.testing.assert_array_equal(positions, sample_positions(len(features), 300, seed=4))
    np.testing.assert_array_equal(sample_positions(50, 300, seed=4), np.arange(50))
    labels = np.arange(len(features)) % 7
    chunks = ((None, features[i:i + 700], labels[i:i + 700]) for i in range(0, len(features), 700))
    picked_features, picked_labels = rows_at(chunks, positions)
    np.testing.assert_array_equal(picked_features, features[positions])
    np.testing.assert_array_equal(picked_labels, labels[positions])


def test_impossible_sizes_are_refused():
    with pytest.raises(UsageError, match="the pool has 99 samples.*--finetune-size 99 or less"):
        StreamingSelection("topk", 99, 10, 100, [1.0])
    with pytest.raises(UsageError, match="metric set"):
        StreamingSelection("topk", 1000, 200, 100, [1.0])
    with pytest.raises(UsageError, match="unknown selection strategy"):
        StreamingSelection("best", 1000, 10, 100, [1.0])
    selection = StreamingSelection("topk", 1000, 10, 100, [1.0])
    selection.update(np.zeros(500), np.zeros(500, dtype=np.int32))
    with pytest.raises(ValueError, match="500 rows, 1000 were announced"):
        selection.result()


# --- the command ---------------------------------------------------------------------------

@pytest.fixture
def gmm_file(tmp_path, tapvits, tiny_model_file):
    path = tmp_path / "device.gmm.safetensors"
    result = tapvits("fit-gmm", "--data", DEVICE, "--extractor", tiny_model_file, "--pca-dim", "8", "-o", path)
    assert result.exit_code == 0, result.stderr
    return path


@pytest.fixture
def table_file(tmp_path, tapvits, tiny_model_file):
    path = tmp_path / "pool.h5"
    result = tapvits("features", "--data", POOL, "--extractor", tiny_model_file, "--batch-size", "64", "-o", path)
    assert result.exit_code == 0, result.stderr
    return path


def select_cli(tapvits, gmm, pool, output, *extra):
    return tapvits("select", gmm, "--pool", pool, "-o", output, "--metric-size", "40", "--finetune-size", "100", *extra)


def test_select_from_a_feature_table(gmm_file, table_file, tmp_path, tapvits):
    from tapvits_cli.artifacts.features import open_feature_table
    from tapvits_cli.artifacts.files import sha256_file
    from tapvits_cli.artifacts.gmm import read_gmm
    from tapvits_cli.data import open_dataset

    out = tmp_path / "metric.h5"
    result = select_cli(tapvits, gmm_file, table_file, out, "--chunk-rows", "50", "--strategy", "topk")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{out}\n" and "log-likelihood" in result.stderr
    metric_set = read_metric_set(out)
    dataset = open_dataset(POOL)
    assert (metric_set.metric_size, metric_set.finetune_size, metric_set.strategy) == (40, 100, "topk")
    assert metric_set.finetune_ids.dtype == np.int64 and len(metric_set.finetune_ids) == 100
    np.testing.assert_array_equal(metric_set.metric_ids, metric_set.ids[:40])
    assert metric_set.pool == {"reference": str(dataset.ref), "fingerprint": dataset.fingerprint(), "samples": 364}
    np.testing.assert_array_equal(metric_set.labels, dataset.labels[dataset.positions_of(metric_set.ids)])
    assert metric_set.gmm_sha256 == sha256_file(gmm_file)
    read = read_gmm(gmm_file)
    mixture, info = read.mixture, read.info
    assert metric_set.extractor_sha256 == info.extractor_sha256
    with open_feature_table(table_file) as table:
        ids, features, _ = next(table.iter_chunks(table.rows))
    loglik, component = mixture.log_likelihood(features)
    expected = np.lexsort((ids, -loglik))[:100]
    np.testing.assert_array_equal(metric_set.ids, ids[expected])
    np.testing.assert_allclose(metric_set.log_likelihood, loglik[expected])
    np.testing.assert_array_equal(metric_set.component, component[expected])
    header = metric_set.artifact.header
    assert header.inputs["gmm"].sha256 == sha256_file(gmm_file) and header.inputs["pool"].kind == "features"
    assert header.params["chunk_rows"] == 50 and header.params["strategy"] == "topk"

    assert tapvits("validate", out).stdout == f"{out}: ok (metric-set v1)\n"
    document = tapvits("inspect", "--json", out).json()
    assert document["figures"]["pool"] == str(dataset.ref) and document["figures"]["finetune_size"] == 100
    per_label = {row[0]: row[1:] for row in document["tables"][1]["rows"]}
    assert sum(m for m, _ in per_label.values()) == 40 and sum(f for _, f in per_label.values()) == 100


def test_dataset_pool_gives_the_same_selection(gmm_file, table_file, tmp_path, tapvits, tiny_model_file):
    from_table, from_data = tmp_path / "table.h5", tmp_path / "data.h5"
    for strategy in ("topk", "stratified"):
        assert select_cli(tapvits, gmm_file, table_file, from_table, "--strategy", strategy).exit_code == 0
        result = select_cli(tapvits, gmm_file, POOL, from_data, "--extractor", tiny_model_file,
                            "--batch-size", "64", "--strategy", strategy)
        assert result.exit_code == 0, result.stderr
        a, b = read_metric_set(from_table), read_metric_set(from_data)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.log_likelihood, b.log_likelihood, rtol=1e-6)
        assert a.pool == b.pool
    assert read_metric_set(from_data).artifact.header.inputs["pool"].kind == "dataset"


def test_selection_prefers_the_devices_classes(table_file, tmp_path, tapvits, tiny_model_file):
    """The device holds 0s and 1s, 20% of the pool. Fixed seeds make this deterministic; the
    margin is not luck: with default options (no PCA for 24-dim features) the metric set's
    precision measured 0.70-0.90 over seven tiny-model seeds, random 0.25. (Standardised
    PCA to 8 dims measured 0.25-0.60 on these untrained features, hence the defaults here.)"""
    gmm = tmp_path / "default.gmm.safetensors"
    assert tapvits("fit-gmm", "--data", DEVICE, "--extractor", tiny_model_file, "-o", gmm).exit_code == 0
    precision = {}
    for strategy in ("topk", "stratified", "random"):
        out = tmp_path / f"{strategy}.h5"
        assert select_cli(tapvits, gmm, table_file, out, "--strategy", strategy).exit_code == 0
        precision[strategy] = np.isin(read_metric_set(out).labels[:40], [0, 1]).mean()
    assert precision["topk"] >= 0.6 and precision["stratified"] >= 0.6
    assert precision["random"] <= 0.4
    assert precision["topk"] - precision["random"] >= 0.3


def test_ratio_strategies_from_the_command_line(gmm_file, table_file, tmp_path, tapvits, tiny_model_file):
    from tapvits_cli.artifacts.features import open_feature_table
    from tapvits_cli.artifacts.gmm import read_gmm
    from tapvits_cli.cli.select import command
    from tapvits_cli.vocabulary import DEFAULT_SELECTION_STRATEGY
    from tapvits_cli.selection.density_ratio import fit_public_mixture, sample_positions

    option = next(p for p in command.params if p.name == "strategy")
    assert tuple(option.type.choices) == STRATEGIES and option.default == DEFAULT_SELECTION_STRATEGY in STRATEGIES
    out = tmp_path / "ratio.h5"
    result = select_cli(tapvits, gmm_file, table_file, out, "--strategy", "ratio", "--public-components", "3",
                        "--public-sample", "200", "--chunk-rows", "64", "--json")
    assert result.exit_code == 0, result.stderr
    body = result.json()
    assert body["public_mixture"]["components"] == 3 and body["public_mixture"]["samples"] == 200
    metric_set = read_metric_set(out)
    assert metric_set.strategy == "ratio" and metric_set.score is not None
    assert metric_set.public_mixture == body["public_mixture"]
    # the same ranking recomputed by hand: the public mixture on the same seeded 200 rows
    mixture = read_gmm(gmm_file).mixture
    with open_feature_table(table_file) as table:
        ids, features, _ = next(table.iter_chunks(table.rows))
    public = fit_public_mixture(features[sample_positions(len(ids), 200, 0)], mixture, 3, 0)
    loglik, component = mixture.log_likelihood(features)
    ratio = loglik - public.mixture.log_likelihood(features)[0]
    expected = np.lexsort((np.arange(len(ids)), -ratio))
    assert set(metric_set.ids) == set(ids[expected[:100]]) and set(metric_set.metric_ids) == set(ids[expected[:40]])
    np.testing.assert_allclose(np.sort(metric_set.score), np.sort(ratio[expected[:100]]), rtol=1e-9)
    # coverage: recorded, recomputable from the component column, shown by inspect and select
    coverage = selection_coverage(metric_set.component, mixture.weights, 40)
    assert metric_set.coverage["finetune"]["coverage"] == pytest.approx(coverage["finetune"]["coverage"])
    assert body["coverage"]["metric"]["coverage"] == pytest.approx(coverage["metric"]["coverage"])
    assert tapvits("validate", out).exit_code == 0
    figures = tapvits("inspect", "--json", out).json()["figures"]
    assert figures["coverage_finetune"] == pytest.approx(coverage["finetune"]["coverage"], abs=1e-4)
    assert figures["public_mixture"]["components"] == 3
    # the dataset pool embeds only the sampled rows for the public mixture, then gives the same selection
    stratified_table, stratified_data = tmp_path / "rs-table.h5", tmp_path / "rs-data.h5"
    options = ("--strategy", "ratio-stratified", "--public-components", "3", "--public-sample", "200")
    assert select_cli(tapvits, gmm_file, table_file, stratified_table, *options).exit_code == 0
    result = select_cli(tapvits, gmm_file, POOL, stratified_data, "--extractor", tiny_model_file, *options)
    assert result.exit_code == 0, result.stderr
    a, b = read_metric_set(stratified_table), read_metric_set(stratified_data)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.score, b.score, rtol=1e-6)
    quotas = proportional_quotas(mixture.weights, 100, np.bincount(component, minlength=mixture.components))
    np.testing.assert_array_equal(np.bincount(a.component, minlength=mixture.components), quotas)


def test_a_gmm_from_another_extractor_is_refused(gmm_file, tmp_path, tapvits):
    from tests.conftest import TINY_VIT, TINY_VIT_KWARGS, model_args

    other = tmp_path / "other.safetensors"
    assert tapvits("create-model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "--seed", "1", "-o", other).exit_code == 0
    table = tmp_path / "other-pool.h5"
    assert tapvits("features", "--data", POOL, "--extractor", other, "-o", table).exit_code == 0
    result = select_cli(tapvits, gmm_file, table, tmp_path / "m.h5")
    assert result.exit_code == ExitCode.INCOMPATIBLE and result.stdout == ""
    from tapvits_cli.artifacts.features import open_feature_table
    from tapvits_cli.artifacts.gmm import read_gmm

    with open_feature_table(table) as opened:
        table_sha = opened.extractor_sha256
    assert read_gmm(gmm_file).info.extractor_sha256[:12] in result.stderr and table_sha[:12] in result.stderr
    assert "vit_tiny_patch16_224" in result.stderr
    on_the_fly = select_cli(tapvits, gmm_file, POOL, tmp_path / "m.h5", "--extractor", other)
    assert on_the_fly.exit_code == ExitCode.INCOMPATIBLE
    assert not (tmp_path / "m.h5").exists()


def test_pool_usage_errors(gmm_file, table_file, tmp_path, tapvits, tiny_model_file):
    out = tmp_path / "m.h5"
    no_extractor = select_cli(tapvits, gmm_file, POOL, out)
    assert no_extractor.exit_code == ExitCode.USAGE and "needs --extractor" in no_extractor.stderr
    both = select_cli(tapvits, gmm_file, table_file, out, "--extractor", tiny_model_file)
    assert both.exit_code == ExitCode.USAGE
    wrong_kind = select_cli(tapvits, gmm_file, tiny_model_file, out)
    assert wrong_kind.exit_code == ExitCode.INCOMPATIBLE and "expected a features artifact" in wrong_kind.stderr
    too_big = tapvits("select", gmm_file, "--pool", table_file, "-o", out)  # default 6,400 > 364
    assert too_big.exit_code == ExitCode.USAGE and "--finetune-size 364 or less" in too_big.stderr
    not_a_gmm = select_cli(tapvits, tiny_model_file, table_file, out)
    assert not_a_gmm.exit_code == ExitCode.INCOMPATIBLE
    assert not out.exists()


def test_broken_metric_sets_are_rejected(gmm_file, table_file, tmp_path, tapvits):
    import shutil

    good = tmp_path / "metric.h5"
    assert select_cli(tapvits, gmm_file, table_file, good, "--strategy", "random").exit_code == 0
    assert tapvits("validate", good).exit_code == 0  # random is ordered by likelihood within each part too

    def broken(edit):
        path = tmp_path / "broken.h5"
        shutil.copy(good, path)
        with h5py.File(path, "r+") as handle:
            edit(handle)
        return tapvits("validate", path)

    def reverse(handle):
        data = handle["selection/log_likelihood"][:]
        handle["selection/log_likelihood"][:] = data[::-1]

    def duplicate(handle):
        ids = handle["selection/ids"][:]
        ids[1] = ids[0]
        handle["selection/ids"][:] = ids

    cases = [
        (reverse, ExitCode.INVALID_ARTIFACT, "decreasing log_likelihood"),
        (duplicate, ExitCode.INVALID_ARTIFACT, "distinct"),
        (lambda h: h.attrs.__setitem__("metric-set.pool", "{}"), ExitCode.INVALID_ARTIFACT, "metric-set.pool"),
        (lambda h: h["selection"].attrs.__setitem__("metric_size", 101), ExitCode.INVALID_ARTIFACT, "metric_size"),
        (lambda h: h.__delitem__("selection/label"), ExitCode.INVALID_ARTIFACT, "selection/label"),
        (lambda h: h["selection"].attrs.__setitem__("encoding-version", "2"), ExitCode.INCOMPATIBLE, "v2"),
        (lambda h: h.attrs.__setitem__("metric-set.coverage", h.attrs["metric-set.coverage"].replace(
            '"coverage":', '"coverage":0.5,"was":', 1)), ExitCode.INVALID_ARTIFACT, "does not match"),
        (lambda h: h["selection"].create_dataset("score", data=np.zeros(3)), ExitCode.INVALID_ARTIFACT,
         "finetune_size"),
        (lambda h: h.attrs.__setitem__("tapvits.version", "2"), ExitCode.INCOMPATIBLE, "v2"),
    ]
    for edit, code, needle in cases:
        result = broken(edit)
        assert result.exit_code == code and needle in result.stderr, (needle, result.stderr)


# --- class-prior --------------------------------------------------------------------------------

def test_class_prior_recovers_the_device_shares_of_overlapping_classes():
    """Shares by EM over draws of the device mixture; a neighbouring class the device lacks
    overlaps its classes yet gets (almost) nothing, and the estimate does not depend on the pool's own mix."""
    from tapvits_cli.selection.class_prior import MIN_CLASS_SHARE, estimate_class_prior

    rng = np.random.default_rng(0)
    centres = np.array([[0, 0, 0], [3, 0, 0], [0, 3, 0], [1.5, 0, 0], [9, 9, 9]], dtype=float)
    labels = np.repeat(np.arange(5), [2000, 400, 1500, 1500, 1500])          # the pool's mix is not the device's
    features = centres[labels] + rng.normal(size=(len(labels), 3))
    private = rng.choice([0, 1, 2], size=1500, p=[0.6, 0.3, 0.1])            # class 3 sits between 0 and 1
    device = device_mixture(centres[private] + rng.normal(size=(1500, 3)), 3)
    prior = estimate_class_prior(device, features, labels, classes=6, draws=20000, seed=0)
    assert prior.converged and prior.draws == 20000 and prior.pool_rows == len(labels)
    assert prior.shares.sum() == pytest.approx(1.0) and prior.shares[5] == 0.0   # a class without pool rows
    np.testing.assert_allclose(prior.shares[:3], [0.6, 0.3, 0.1], atol=0.06)
    assert prior.shares[3] <= 0.06 and prior.shares[4] == 0.0                  # overlapping: small; far: none
    assert ((prior.shares == 0) | (prior.shares >= MIN_CLASS_SHARE)).all()
    again = estimate_class_prior(device, features, labels, classes=6, draws=20000, seed=0)
    np.testing.assert_array_equal(prior.shares, again.shares)                  # seeded
    with pytest.raises(UsageError, match="labelled pool"):
        estimate_class_prior(device, features, labels, classes=4)


def test_class_prior_quotas_follow_the_shares_and_the_supply():
    loglik, component = scores()
    score = ratio_scores(loglik)
    inputs = class_prior_inputs("class-prior")
    labels, shares = inputs["labels"], inputs["class_shares"]
    chosen = select(loglik, component, [0.25] * 4, 64, 640, "class-prior", score=score, **inputs)
    supply = np.bincount(labels, minlength=5)
    finetune_quota = proportional_quotas(shares, 640, supply)
    np.testing.assert_array_equal(np.bincount(labels[chosen], minlength=5), finetune_quota)
    np.testing.assert_array_equal(np.bincount(labels[chosen[:64]], minlength=5),
                                  proportional_quotas(shares, 64, finetune_quota))
    assert finetune_quota[1] == 0                                              # a class the device does not hold
    for c in range(5):                                                         # within a class: by density ratio
        members = np.flatnonzero(labels == c)
        best = members[np.lexsort((members, -score[members]))[:finetune_quota[c]]]
        assert set(chosen[labels[chosen] == c]) == set(best)
    with pytest.raises(ValueError, match="class shares go with the class-prior strategy"):
        select(loglik, component, [0.25] * 4, 64, 640, "class-prior", score=score)
    with pytest.raises(ValueError, match="needs labels in 0..4"):
        select(loglik, component, [0.25] * 4, 64, 640, "class-prior", score=score, labels=labels + 1,
               class_shares=shares)


def test_a_class_floor_gives_every_class_fine_tuning_rows_and_leaves_the_metric_set():
    loglik, component = scores()
    score = ratio_scores(loglik)
    inputs = class_prior_inputs("class-prior")
    labels, shares = inputs["labels"], np.asarray(inputs["class_shares"])
    plain = select(loglik, component, [0.25] * 4, 64, 640, "class-prior", score=score, **inputs)
    floored = select(loglik, component, [0.25] * 4, 64, 640, "class-prior", score=score, class_floor=0.2,
                     **inputs)
    supply = np.bincount(labels, minlength=5)
    weights = 0.8 * shares + 0.2 * supply / supply.sum()
    np.testing.assert_array_equal(np.bincount(labels[floored], minlength=5), proportional_quotas(weights, 640, supply))
    assert np.bincount(labels[plain], minlength=5)[1] == 0 < np.bincount(labels[floored], minlength=5)[1]
    np.testing.assert_array_equal(np.sort(floored[:64]), np.sort(plain[:64]))   # the metric set: shares alone
    with pytest.raises(UsageError, match="needs the class-prior strategy"):
        select(loglik, component, [0.25] * 4, 64, 640, "ratio", score=score, class_floor=0.2)
    with pytest.raises(UsageError, match=r"in \[0, 1\)"):
        select(loglik, component, [0.25] * 4, 64, 640, "class-prior", score=score, class_floor=1.0, **inputs)


def test_class_prior_covers_a_dense_and_a_broad_class_with_high_precision():
    from tapvits_cli.selection.class_prior import estimate_class_prior
    from tapvits_cli.selection.density_ratio import fit_public_mixture, sample_positions

    features, labels, private_features = dense_and_broad_pool()
    device = device_mixture(private_features, 2)
    positions = sample_positions(len(features), 5000, seed=0)
    prior = estimate_class_prior(device, features[positions], labels[positions], classes=5, seed=0)
    public = fit_public_mixture(features[positions], device, components=8, seed=0)
    loglik, component = device.log_likelihood(features)
    ratio = loglik - public.mixture.log_likelihood(features)[0]
    chosen = select(loglik, component, device.weights, 200, 1200, "class-prior", score=ratio, labels=labels,
                    class_shares=prior.shares)
    for part in (chosen, chosen[:200]):
        share = np.bincount(labels[part], minlength=5) / len(part)
        assert share[0] >= 0.4 and share[1] >= 0.4 and share[:2].sum() >= 0.98, share


def test_class_prior_from_the_command_line(gmm_file, table_file, tmp_path, tapvits, tiny_model_file):
    """Recorded shares, per-class quotas in the file, the same selection from a dataset pool,
    and a metric set whose recorded shares were tampered with is refused (exit 3)."""
    out = tmp_path / "prior.h5"
    options = ("--strategy", "class-prior", "--public-sample", "300", "--prior-draws", "5000")
    result = select_cli(tapvits, gmm_file, table_file, out, *options, "--json")
    assert result.exit_code == 0, result.stderr
    body = result.json()
    assert "class prior:" in result.stderr
    metric_set = read_metric_set(out)
    shares = np.asarray(metric_set.class_prior["shares"])
    assert metric_set.strategy == "class-prior" and body["class_prior"] == metric_set.class_prior
    assert len(shares) == 10 and shares.sum() == pytest.approx(1.0, abs=1e-5)
    assert metric_set.class_prior["draws"] == 5000 and metric_set.class_prior["pool_rows"] == 300
    held = set(np.flatnonzero(shares))
    assert set(metric_set.labels) <= held                                      # no row of a class without a share
    assert tapvits("inspect", "--json", out).json()["figures"]["class_prior"]["classes_held"] == len(held)
    from_data = tmp_path / "prior-data.h5"
    result = select_cli(tapvits, gmm_file, POOL, from_data, "--extractor", tiny_model_file, *options)
    assert result.exit_code == 0, result.stderr
    np.testing.assert_array_equal(read_metric_set(from_data).ids, metric_set.ids)

    floored = tmp_path / "floor.h5"
    result = select_cli(tapvits, gmm_file, table_file, floored, *options, "--class-floor", "0.5")
    assert result.exit_code == 0, result.stderr
    floor_set = read_metric_set(floored)
    assert floor_set.artifact.header.params["class_floor"] == 0.5
    assert set(floor_set.labels) == set(range(10)) > held                    # every class, held or not
    np.testing.assert_array_equal(np.sort(floor_set.ids[:40]), np.sort(metric_set.ids[:40]))
    assert tapvits("validate", floored).exit_code == 0
    result = select_cli(tapvits, gmm_file, table_file, tmp_path / "x.h5", "--class-floor", "0.5", "--strategy", "topk")
    assert result.exit_code == ExitCode.USAGE and "needs the class-prior strategy" in result.stderr

    import json as json_module
    import shutil

    tampered = tmp_path / "tampered.h5"
    shutil.copy(out, tampered)
    with h5py.File(tampered, "r+") as handle:
        key = next(k for k in handle.attrs if k.endswith(".class_prior"))
        record = json_module.loads(handle.attrs[key])
        record["shares"] = [0.5] * len(record["shares"])
        handle.attrs[key] = json_module.dumps(record, separators=(",", ":"))
    result = tapvits("validate", tampered)
    assert result.exit_code == ExitCode.INVALID_ARTIFACT and "sum to 1" in result.stderr


def test_class_prior_counts_classes_from_the_whole_table_when_it_records_none(gmm_file, table_file, tmp_path, tapvits):
    """A feature table may leave out ``num_classes``: the class count then comes from the whole pool's
    labels, not from the sample the classifier is fitted on, which can miss the largest label."""
    import json as json_module
    import shutil

    from tapvits_cli.artifacts.features import open_feature_table
    from tapvits_cli.selection.density_ratio import sample_positions

    bare = tmp_path / "no-classes.h5"
    shutil.copy(table_file, bare)
    with h5py.File(bare, "r+") as handle:
        record = json_module.loads(handle.attrs["features.dataset"])
        record.pop("num_classes")
        handle.attrs["features.dataset"] = json_module.dumps(record, separators=(",", ":"))
    with open_feature_table(bare) as table:
        labels = table.labels()
    sampled = labels[sample_positions(len(labels), 15, 0)]
    assert sampled.max() < labels.max()   # the case: the sample alone would count too few classes
    out = tmp_path / "prior.h5"
    result = select_cli(tapvits, gmm_file, bare, out, "--strategy", "class-prior", "--public-sample", "15",
                        "--prior-draws", "500")
    assert result.exit_code == 0, result.stderr
    assert len(read_metric_set(out).class_prior["shares"]) == labels.max() + 1


@pytest.mark.parametrize("strategy", ["topk", "stratified", "ratio", "class-prior"])
def test_a_mixture_whose_densities_overflow_on_the_pool_selects_nothing(gmm_file, table_file, tmp_path, tapvits,
                                                                        monkeypatch, strategy):
    """A review found a GMM that passes every check on the file yet scores every pool row −inf; select exited 0
    with a metric set ranked by nothing. Overflow on the pool's own features is simulated here."""
    from tapvits_cli.payloads.mixture import Mixture

    genuine = Mixture.log_likelihood

    def overflowing(self, features):
        loglik, component = genuine(self, features)
        return np.full_like(loglik, -np.inf), component

    monkeypatch.setattr(Mixture, "log_likelihood", overflowing)
    out = tmp_path / "m.h5"
    result = select_cli(tapvits, gmm_file, table_file, out, "--strategy", strategy)
    assert result.exit_code == ExitCode.INVALID_ARTIFACT, result.stderr
    assert "its log-density overflows on 100 of the 100 selected pool rows" in result.stderr
    assert not out.exists() and not list(tmp_path.glob("m.h5*"))
