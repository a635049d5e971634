"""The ``metric-set`` artifact: which public samples a device's GMM picked, as an HDF5 table.

See protocol/metric-set.md. One ordered list of pool sample ids: the first
``metric_size`` rows are the metric set (``score``), all ``finetune_size`` rows the
fine-tuning set (``finetune``). Ids refer to the pool named in ``metric-set.pool``; no
image is copied.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from tapvits_cli.artifacts.containers import (ArtifactFile, attr_string, check_group_encoding, hdf5_reading,
                                              set_group_encoding, write_hdf5)
from tapvits_cli.artifacts.header import Header, LineageEntry, compact_json, finite_number
from tapvits_cli.artifacts.kinds import KindSpec, Summary, Table, read_artifact, register
from tapvits_cli.payloads.coverage import selection_coverage
from tapvits_cli.vocabulary import SELECTION_STRATEGIES

KIND = "metric-set"
VERSION = 1
GROUP = "selection"
ENCODING_TYPE = "metric-set"
ENCODING_VERSION = 1
_COLUMNS = {"ids": np.int64, "log_likelihood": np.float64, "component": np.int32, "label": np.int64}
_POOL_KEYS = ("reference", "fingerprint", "samples")


@dataclass(frozen=True)
class MetricSet:
    """A read metric set; ``ids[:metric_size]`` is the metric set, ``ids`` the fine-tuning set."""

    ids: np.ndarray
    log_likelihood: np.ndarray
    component: np.ndarray
    labels: np.ndarray
    metric_size: int
    finetune_size: int
    strategy: str
    pool: Mapping[str, Any]          # {"reference", "fingerprint", "samples"}
    gmm_sha256: str
    extractor_sha256: str
    artifact: ArtifactFile
    score: np.ndarray | None = None                  # the ratio strategies' density ratio, per row
    coverage: Mapping[str, Any] | None = None        # payloads.coverage.selection_coverage(...)
    public_mixture: Mapping[str, Any] | None = None  # what the ratio strategies fitted on the pool
    class_prior: Mapping[str, Any] | None = None     # the class-prior strategy's estimated class shares

    @property
    def metric_ids(self) -> np.ndarray:
        return self.ids[: self.metric_size]

    @property
    def finetune_ids(self) -> np.ndarray:
        return self.ids[: self.finetune_size]

    def positions_in(self, pool, ids: np.ndarray) -> np.ndarray:
        """Positions of ``ids`` (some of this set's) in ``pool``, the dataset whose fingerprint it records.

        Only the pool can tell whether an id exists, so this rule is checked where the pool
        is opened (``score``, ``finetune``): once the fingerprint matches, an id the pool
        lacks means the metric set itself is corrupt (exit 3), not that the pool is another.
        """
        try:
            return pool.positions_of(ids)
        except ValueError as exc:
            raise self.artifact.fail(f"ids outside its pool: {exc}") from None


def write_metric_set(path: str | os.PathLike, selection, pool: Mapping[str, Any], gmm_sha256: str,
                     extractor_sha256: str, params: Mapping[str, Any],
                     inputs: Mapping[str, LineageEntry] | None = None, coverage: Mapping[str, Any] | None = None,
                     public_mixture: Mapping[str, Any] | None = None, class_prior: Mapping[str, Any] | None = None):
    """Write a :class:`~tapvits_cli.selection.Selection` whose columns hold ``ids`` and ``labels``.

    ``coverage`` (``payloads.coverage.selection_coverage``), ``public_mixture`` (what a ratio
    strategy fitted) and ``class_prior`` (the class-prior strategy's estimate) are optional
    attributes; a selection with a ``score`` writes its column.
    """
    header = Header(kind=KIND, version=VERSION, inputs=dict(inputs or {}), params=dict(params))
    metadata = {
        f"{KIND}.pool": compact_json({key: pool[key] for key in _POOL_KEYS}),
        f"{KIND}.gmm_sha256": gmm_sha256,
        f"{KIND}.extractor_sha256": extractor_sha256,
    }
    if coverage is not None:
        metadata[f"{KIND}.coverage"] = compact_json(dict(coverage))
    if public_mixture is not None:
        metadata[f"{KIND}.public_mixture"] = compact_json(dict(public_mixture))
    if class_prior is not None:
        metadata[f"{KIND}.class_prior"] = compact_json(dict(class_prior))
    columns = {"ids": selection.columns["ids"], "log_likelihood": selection.log_likelihood,
               "component": selection.component, "label": selection.columns["labels"]}

    def fill(handle) -> None:
        group = handle.create_group(GROUP)
        set_group_encoding(group, ENCODING_TYPE, ENCODING_VERSION)
        group.attrs["metric_size"] = np.int64(selection.metric_size)
        group.attrs["finetune_size"] = np.int64(selection.finetune_size)
        group.attrs["strategy"] = selection.strategy
        for name, dtype in _COLUMNS.items():
            group.create_dataset(name, data=np.asarray(columns[name], dtype=dtype))
        if getattr(selection, "score", None) is not None:
            group.create_dataset("score", data=np.asarray(selection.score, dtype=np.float64))

    return write_hdf5(path, header, metadata, fill)


def read_metric_set(path: str | os.PathLike) -> MetricSet:
    """Read and check a metric set (every rule of protocol/metric-set.md)."""
    artifact = read_artifact(path, expect=KIND)
    metric_set = _parse(artifact)
    _check(metric_set)
    return metric_set


def _parse(artifact: ArtifactFile) -> MetricSet:
    import h5py

    for key in ("pool", "gmm_sha256", "extractor_sha256"):
        if f"{KIND}.{key}" not in artifact.metadata:
            raise artifact.fail(f"required key '{KIND}.{key}' is missing")
    pool = artifact.json_field(f"{KIND}.pool")
    if not isinstance(pool, dict) or not set(_POOL_KEYS) <= set(pool) or not isinstance(pool["reference"], str) \
            or not isinstance(pool["fingerprint"], str) or not isinstance(pool["samples"], int) \
            or isinstance(pool["samples"], bool):
        raise artifact.fail(f"'{KIND}.pool' must be a JSON object with a reference and a fingerprint (strings) "
                            "and samples (an integer)")
    with hdf5_reading(artifact.path), h5py.File(artifact.path, "r") as handle:
        group = handle.get(GROUP)
        if not isinstance(group, h5py.Group):
            raise artifact.fail(f"group '{GROUP}' is missing")
        check_group_encoding(group, artifact.path, GROUP, ENCODING_TYPE, ENCODING_VERSION)
        columns = {}
        for name, dtype in _COLUMNS.items():
            dataset = group.get(name)
            if not isinstance(dataset, h5py.Dataset):
                raise artifact.fail(f"dataset '{GROUP}/{name}' is missing")
            if dataset.dtype != dtype or dataset.ndim != 1:
                raise artifact.fail(f"'{GROUP}/{name}' is {dataset.dtype} {dataset.shape}, the spec needs 1-D "
                                      f"{np.dtype(dtype)}")
            columns[name] = dataset[:]
        score = group.get("score")
        if score is not None:
            if not isinstance(score, h5py.Dataset) or score.dtype != np.float64 or score.ndim != 1:
                raise artifact.fail(f"'{GROUP}/score' must be a 1-D float64 dataset")
            score = score[:]
        sizes = {}
        for name in ("metric_size", "finetune_size"):
            value = group.attrs.get(name)
            if not isinstance(value, (int, np.integer)):
                raise artifact.fail(f"attribute '{GROUP}/{name}' must be an integer")
            sizes[name] = int(value)
        strategy = attr_string(group.attrs.get("strategy"))
    optional = {}
    for key in ("coverage", "public_mixture", "class_prior"):
        if f"{KIND}.{key}" in artifact.metadata:
            optional[key] = artifact.json_field(f"{KIND}.{key}")
            if not isinstance(optional[key], dict):
                raise artifact.fail(f"'{KIND}.{key}' must be a JSON object")
    return MetricSet(ids=columns["ids"], log_likelihood=columns["log_likelihood"], component=columns["component"],
                     labels=columns["label"], strategy=str(strategy), pool=pool,
                     gmm_sha256=artifact.metadata[f"{KIND}.gmm_sha256"],
                     extractor_sha256=artifact.metadata[f"{KIND}.extractor_sha256"], artifact=artifact, score=score,
                     **optional, **sizes)


def _check(metric_set: MetricSet) -> None:
    artifact, ids = metric_set.artifact, metric_set.ids
    if metric_set.strategy not in SELECTION_STRATEGIES:
        raise artifact.fail(f"unknown strategy {metric_set.strategy!r}")
    if not 1 <= metric_set.metric_size <= metric_set.finetune_size:
        raise artifact.fail("metric_size must be >= 1 and <= finetune_size")
    lengths = {len(ids), len(metric_set.log_likelihood), len(metric_set.component), len(metric_set.labels)}
    if metric_set.score is not None:
        lengths.add(len(metric_set.score))
        if np.isnan(metric_set.score).any():
            raise artifact.fail("score must not be NaN")
    if lengths != {metric_set.finetune_size}:
        raise artifact.fail(f"every column must have finetune_size ({metric_set.finetune_size}) rows")
    _check_coverage(metric_set)
    _check_class_prior(metric_set)
    samples = metric_set.pool["samples"]
    if ids.min() < 0 or len(np.unique(ids)) != len(ids):
        raise artifact.fail("ids must be distinct non-negative integers")
    if not isinstance(samples, int) or metric_set.finetune_size > samples:
        raise artifact.fail(f"{metric_set.finetune_size} rows selected from a pool of {samples} samples")
    if not np.isfinite(metric_set.log_likelihood).all():
        raise artifact.fail("log_likelihood must be finite")
    if (metric_set.component < 0).any() or (metric_set.labels < 0).any():
        raise artifact.fail("component and label must be >= 0")
    for part in (metric_set.log_likelihood[: metric_set.metric_size],
                 metric_set.log_likelihood[metric_set.metric_size:]):
        if (part[1:] > part[:-1]).any():   # a comparison, not np.diff: −inf − −inf would warn
            raise artifact.fail("rows must be ordered by decreasing log_likelihood within the metric set "
                                  "and within the rest")


def _check_class_prior(metric_set: MetricSet) -> None:
    """The class-prior strategy records its class shares (and only it): finite, ≥ 0, summing to 1,
    one per class of the pool, so every selected row's label has a share."""
    prior, artifact = metric_set.class_prior, metric_set.artifact
    if (metric_set.strategy == "class-prior") != (prior is not None):
        raise artifact.fail(f"'{KIND}.class_prior' goes with the class-prior strategy, and only with it")
    if prior is None:
        return
    shares = prior.get("shares")
    if (not isinstance(shares, list) or not shares
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in shares)):
        raise artifact.fail(f"'{KIND}.class_prior' must hold 'shares', a non-empty list of numbers")
    shares = np.asarray(shares, dtype=np.float64)
    if not np.isfinite(shares).all() or (shares < 0).any() or abs(shares.sum() - 1.0) > 1e-4:
        raise artifact.fail(f"'{KIND}.class_prior' shares must be finite, non-negative and sum to 1")
    if len(metric_set.labels) and metric_set.labels.max() >= len(shares):
        raise artifact.fail(f"label {int(metric_set.labels.max())} has no class share (the shares cover "
                            f"{len(shares)} classes)")


def _check_coverage(metric_set: MetricSet) -> None:
    """The recorded coverage must be what the component column and the recorded weights give."""
    coverage, artifact = metric_set.coverage, metric_set.artifact
    if coverage is None:
        return
    weights = coverage.get("weights")
    if not isinstance(weights, list) or not weights or not all(isinstance(w, (int, float)) for w in weights):
        raise artifact.fail(f"'{KIND}.coverage' must hold the mixture weights as a list of numbers")
    try:
        expected = selection_coverage(metric_set.component, weights, metric_set.metric_size)
    except ValueError as exc:
        raise artifact.fail(f"'{KIND}.coverage': {exc}") from None
    for part in ("metric", "finetune"):
        recorded = coverage.get(part)
        if not isinstance(recorded, dict) or not all(finite_number(recorded.get(key)) for key in
                                                     ("coverage", "worst_ratio")) \
                or not np.isclose(recorded["coverage"], expected[part]["coverage"], atol=1e-9):
            raise artifact.fail(f"'{KIND}.coverage.{part}' does not match the selection's components and weights")


def _validate(artifact: ArtifactFile) -> None:
    _check(_parse(artifact))


def _occurrences(values: np.ndarray, head: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct ``values`` and how often each occurs in the first ``head`` rows and in all."""
    distinct, positions = np.unique(values, return_inverse=True)
    return (distinct, np.bincount(positions[:head], minlength=len(distinct)),
            np.bincount(positions, minlength=len(distinct)))


def _summarize(artifact: ArtifactFile) -> Summary:
    metric_set = _parse(artifact)
    _check(metric_set)   # cheap (the columns are small), and the tables below need a consistent set
    metric, finetune = metric_set.log_likelihood[: metric_set.metric_size], metric_set.log_likelihood
    figures = {
        "strategy": metric_set.strategy,
        "metric_size": metric_set.metric_size,
        "finetune_size": metric_set.finetune_size,
        "pool": metric_set.pool["reference"],
        "pool_samples": metric_set.pool["samples"],
        "pool_fingerprint": metric_set.pool["fingerprint"],
        "log_likelihood_metric": [float(metric.min()), float(metric.max())],
        "log_likelihood_finetune": [float(finetune.min()), float(finetune.max())],
        "gmm_sha256": metric_set.gmm_sha256,
        "extractor_sha256": metric_set.extractor_sha256,
    }
    coverage = metric_set.coverage
    if coverage is not None:
        for part in ("metric", "finetune"):
            figures[f"coverage_{part}"] = round(coverage[part]["coverage"], 4)
            figures[f"worst_component_ratio_{part}"] = round(coverage[part]["worst_ratio"], 4)
    if metric_set.public_mixture is not None:
        figures["public_mixture"] = dict(metric_set.public_mixture)
    if metric_set.class_prior is not None:
        figures["class_prior"] = dict(metric_set.class_prior)
    if metric_set.score is not None:
        figures["density_ratio_metric"] = [float(metric_set.score[: metric_set.metric_size].min()),
                                   float(metric_set.score[: metric_set.metric_size].max())]
    weights = coverage["weights"] if coverage is not None else None
    size = metric_set.metric_size
    if weights is None:   # only the components that occur: a corrupt index must not size a table
        present, in_metric, in_finetune = _occurrences(metric_set.component, size)
        component_table = Table("rows per component", ["component", "metric set", "fine-tuning set"],
                                [[int(c), int(m), int(f)] for c, m, f in zip(present, in_metric, in_finetune)])
    else:   # _check_coverage bounds the components by the weights
        in_metric = np.bincount(metric_set.component[:size], minlength=len(weights))
        in_finetune = np.bincount(metric_set.component, minlength=len(weights))
        component_table = Table(
            "rows per component (share of the set vs the mixture weight)",
            ["component", "weight", "metric set", "share", "fine-tuning set", "share"],
            [[c, round(weights[c], 4), int(in_metric[c]), round(in_metric[c] / size, 4),
              int(in_finetune[c]), round(in_finetune[c] / metric_set.finetune_size, 4)] for c in range(len(weights))])
    labels, label_metric, label_finetune = _occurrences(metric_set.labels, size)
    tables = [
        component_table,
        Table("rows per public label", ["label", "metric set", "fine-tuning set"],
              [[int(label), int(m), int(f)] for label, m, f in zip(labels, label_metric, label_finetune)]),
    ]
    return Summary(figures=figures, tables=tables)


SPEC = register(KindSpec(
    name=KIND, format="hdf5", version=VERSION, validate=_validate, summarize=_summarize,
    description="the public samples selected for a device: metric set and fine-tuning set, as pool ids",
))
