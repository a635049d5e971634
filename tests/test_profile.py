"""`tapvits profile` and the profile artifact: the table's structure, the prediction's sum rule, corruption, errors."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from conftest import TINY_VIT, TINY_VIT_KWARGS, model_args
from tapvits_cli.artifacts.profile import read_profile
from tapvits_cli.errors import ExitCode, IncompatibleArtifactError, NotImplementedStageError, UsageError
from tapvits_cli.payloads.latency_table import (BranchTable, LatencyProfile, check_fits, default_mlp_widths,
                                       mlp_grids, predict_latency, predict_model)
from tapvits_cli.models.spec import BlockWidths, ModelSpec, TokenMerging
from tests.test_protocol_examples import assert_one_line_failure

# The tiny ViT: 2 blocks of 3 heads of 8, MLP 48, 4x4 patches + the class token = 17 tokens.
FULL = BlockWidths(3, 8, 48)
PROFILE_ARGS = ("--batch-sizes", "4,1", "--widths", "8,24,48", "--repeats", "3", "--warmup-runs", "1", "--threads", "1")


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """``(model file, profile file)``: the tiny ViT and its profile, made once for the module's tests."""
    import contextlib
    import io

    from tapvits_cli.cli.main import main

    root = tmp_path_factory.mktemp("profile")
    model, out = root / "tiny.safetensors", root / "device.profile.json"
    for args in (("create-model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "-o", model),
                 ("profile", model, "-o", out, *PROFILE_ARGS)):
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            assert main([str(a) for a in args]) == 0, stderr.getvalue()
    assert stdout.getvalue() == f"{out}\n"
    return model, out


@pytest.fixture
def profile_file(profiled):
    return profiled[1]


def test_profile_round_trips_validates_and_inspects(profile_file, tapvits):
    assert tapvits("validate", profile_file).stdout == f"{profile_file}: ok (profile v1)\n"
    profile = read_profile(profile_file)
    assert profile.model == {"architecture": TINY_VIT, "kwargs": TINY_VIT_KWARGS, "family": "vit",
                             "blocks": [FULL.to_dict()] * 2}
    assert profile.runtime == "torch" and profile.threads == 1 and profile.device == "cpu" and profile.gpu is None
    assert profile.batch_sizes == (1, 4) and profile.tokens == 17 and (profile.repeats, profile.warmup) == (3, 1)
    assert profile.attn.widths == (1, 2, 3) and profile.mlp.widths == (8, 24, 48)
    assert profile.mlp_alignment == 8 and profile.mlp_unaligned.widths == (1, 7, 23, 47)   # the default alignment
    assert profile.attn.median_ms.shape == (3, 2) and profile.mlp.median_ms.shape == (3, 2)
    assert profile.mlp_unaligned.median_ms.shape == (4, 2)
    for values in (profile.embed_ms, profile.head_ms, profile.block_ms, profile.attn.median_ms, profile.mlp.median_ms,
                   profile.mlp_unaligned.median_ms):
        assert np.all(np.isfinite(values)) and np.all(np.asarray(values) > 0)
    document = tapvits("inspect", profile_file, "--json").json()
    assert document["kind"] == "profile" and document["inputs"]["model"]["kind"] == "model"
    assert document["params"]["batch_sizes"] == [1, 4] and document["params"]["widths"] == [8, 24, 48]
    assert document["params"]["mlp_alignment"] == document["figures"]["mlp_alignment"] == 8
    titles = [table["title"] for table in document["tables"]]
    assert titles == ["fixed parts (ms)", "attention-only block (ms) by heads",
                      "MLP-only block (ms) by hidden width, multiples of 8",
                      "MLP-only block (ms) by hidden width, not multiples of 8"]
    assert [row[0] for row in document["tables"][1]["rows"]] == [1, 2, 3]
    assert [row[0] for row in document["tables"][3]["rows"]] == [1, 7, 23, 47]
    assert document["tables"][3]["rows"][1][1:] == pytest.approx(profile.mlp_unaligned.median_ms[1].tolist())
    unpruned = document["figures"]["unpruned_ms"]
    assert unpruned["4"] == pytest.approx(predict_latency(profile, profile.blocks, 4).total_ms, abs=1e-4)
    human = tapvits("inspect", profile_file)
    assert human.exit_code == 0 and "MLP-only block" in human.stdout and "unpruned_ms" in human.stdout


def test_default_mlp_grid():
    assert default_mlp_widths(1536) == (1, 192, 384, 576, 768, 960, 1152, 1344, 1536)
    assert default_mlp_widths(48) == (1, 6, 12, 18, 24, 30, 36, 42, 48)
    assert default_mlp_widths(4) == (1, 2, 3, 4)   # fewer neurons than points: every width, once
    assert mlp_grids(1536) == (default_mlp_widths(1536), None)   # alignment 1: today's single curve
    assert mlp_grids(1536, 8) == ((8, 192, 384, 576, 768, 960, 1152, 1344, 1536),
                                  (1, 7, 191, 383, 575, 767, 959, 1151, 1343, 1535))
    assert mlp_grids(50, 8) == ((8, 16, 24, 32, 40, 48), (1, 7, 15, 23, 31, 39, 47, 50))   # 49, 50: unaligned
    assert mlp_grids(48, 8, (24, 8)) == ((8, 24), (1, 7, 23))


@pytest.mark.parametrize("alignment", [2, 4, 8, 16])
def test_default_grids_cover_every_width_on_its_curve(alignment):
    """Whatever the architecture's width, every width pruning can leave lies within the measured range of
    the curve it reads (no clamping beyond the grid, no refusal), and each curve holds only its kind."""
    for hidden in range(alignment, 400):
        aligned, unaligned = map(np.asarray, mlp_grids(hidden, alignment))
        widths = np.arange(1, hidden + 1)
        multiple = widths % alignment == 0
        assert np.all(aligned % alignment == 0) and np.all(unaligned % alignment != 0)
        assert aligned.max() <= hidden and unaligned.max() <= hidden
        assert aligned.min() <= widths[multiple].min() and widths[multiple].max() <= aligned.max()
        assert unaligned.min() <= widths[~multiple].min() and widths[~multiple].max() <= unaligned.max()


def test_mlp_grids_refuse_widths_off_the_alignment():
    with pytest.raises(UsageError, match=r"MLP widths must be multiples of mlp_alignment 8, not 1, 30:"):
        mlp_grids(48, 8, (1, 24, 30))
    with pytest.raises(UsageError, match="exceeds the architecture's 4 MLP hidden neurons"):
        mlp_grids(4, 8)
    with pytest.raises(UsageError, match="1..48"):
        mlp_grids(48, 8, (8, 96))


def synthetic_profile() -> LatencyProfile:
    """Known numbers: E = 1 / 10 ms, A(h) = E + h, M(m) at 1, 24, 48 neurons, at batch sizes 1 and 8."""
    attn = np.array([[2.0, 20.0], [3.0, 30.0], [4.0, 40.0]])
    mlp = np.array([[1.5, 15.0], [4.0, 40.0], [7.0, 70.0]])
    return LatencyProfile(model={"architecture": TINY_VIT, "kwargs": dict(TINY_VIT_KWARGS), "family": "vit",
                                 "blocks": [FULL.to_dict()] * 2},
                          runtime="torch", runtime_version="x", threads=1, device="cpu", cpu="", gpu=None,
                          batch_sizes=(1, 8), tokens=17, repeats=1, warmup=0, embed_ms=(0.5, 5.0), head_ms=(0.25, 2.5),
                          block_ms=(1.0, 10.0), attn=BranchTable((1, 2, 3), attn), mlp=BranchTable((1, 24, 48), mlp))


def test_prediction_is_the_exact_sum_rule():
    profile = synthetic_profile()
    full = predict_latency(profile, [FULL, FULL], 1)
    # per block: E + (A(3) - E) + (M(48) - E) = 1 + 3 + 6
    assert full.total_ms == pytest.approx(0.5 + 0.25 + 2 * 10.0)
    assert full.blocks_ms.tolist() == [10.0, 10.0] and full.attn_ms.tolist() == [3.0, 3.0]
    # emptied branches add nothing over E; interpolation halfway between 24 and 48 neurons (4 and 7 ms)
    pruned = predict_latency(profile, [BlockWidths(0, 8, 36), BlockWidths(2, 8, 0)], 8)
    assert pruned.attn_ms.tolist() == [0.0, 20.0] and pruned.mlp_ms.tolist() == [pytest.approx(45.0), 0.0]
    assert pruned.total_ms == pytest.approx(5.0 + 2.5 + (10.0 + 45.0) + (10.0 + 20.0))
    empty = predict_latency(profile, [BlockWidths(0, 8, 0)] * 2, 1)
    assert empty.total_ms == pytest.approx(0.5 + 0.25 + 2 * 1.0)
    # a monotone table gives a prediction monotone in every width
    totals = [predict_latency(profile, [BlockWidths(3, 8, m), FULL], 1).total_ms for m in range(0, 49)]
    assert all(a <= b for a, b in zip(totals[1:], totals[2:]))
    with pytest.raises(UsageError, match="batch sizes"):
        predict_latency(profile, [FULL, FULL], 32)


def aligned_profile() -> LatencyProfile:
    """The synthetic profile with an MLP alignment of 8: M on multiples of 8 at 8, 24, 40 neurons and, slower,
    on the other widths at 1, 7, 23, 39, 47 (E = 1 / 10 ms at batch 1 / 8)."""
    aligned = np.array([[2.0, 20.0], [4.0, 40.0], [6.0, 60.0]])
    unaligned = np.array([[1.5, 15.0], [2.5, 25.0], [5.0, 50.0], [7.5, 75.0], [8.0, 80.0]])
    return replace(synthetic_profile(), mlp=BranchTable((8, 24, 40), aligned), mlp_alignment=8,
                   mlp_unaligned=BranchTable((1, 7, 23, 39, 47), unaligned))


def test_prediction_reads_the_curve_of_each_widths_alignment():
    profile = aligned_profile()
    widths = [8, 16, 24, 40, 1, 7, 15, 23, 31, 47, 12]
    prediction = predict_latency(profile, [BlockWidths(0, 8, m) for m in widths], 1)
    # multiples of 8 on the aligned curve (16: halfway between 8 and 24), the rest on the unaligned one
    # (15: halfway between 7 and 23, 31: between 23 and 39; 12, a multiple of 4 only, is unaligned), minus E
    expected = [2.0, 3.0, 4.0, 6.0, 1.5, 2.5, 3.75, 5.0, 6.25, 8.0, 2.5 + 5 / 16 * 2.5]
    np.testing.assert_allclose(prediction.mlp_ms, np.array(expected) - 1.0)
    assert prediction.total_ms == pytest.approx(0.5 + 0.25 + len(widths) * 1.0 + sum(expected) - len(widths))
    # the same table read as one curve (alignment 1) would put every width on the aligned numbers
    one_curve = replace(profile, mlp_alignment=1, mlp_unaligned=None)
    assert predict_latency(one_curve, [BlockWidths(0, 8, 15)], 8).mlp_ms[0] == pytest.approx(20 + 7 / 16 * 20 - 10)
    assert predict_latency(profile, [BlockWidths(0, 8, 15)], 8).mlp_ms[0] == pytest.approx(37.5 - 10.0)
    with pytest.raises(ValueError, match="unaligned table"):
        replace(profile, mlp_unaligned=None)


def test_check_fits_reads_each_curves_range():
    profile = aligned_profile()
    spec = ModelSpec(TINY_VIT, dict(TINY_VIT_KWARGS), "vit", (BlockWidths(3, 8, 40), BlockWidths(3, 8, 47)), {}, 10)
    check_fits(profile, spec)   # 40 on the aligned curve, 47 on the unaligned one
    with pytest.raises(IncompatibleArtifactError, match="48 MLP neurons, the profile measured up to 40 for widths "
                                                        "multiples of 8"):
        check_fits(profile, replace(spec, blocks=(FULL, FULL)))
    with pytest.raises(ValueError, match="measured range"):
        predict_latency(profile, [FULL], 1)


def test_check_fits_refuses_models_the_table_does_not_describe():
    profile = synthetic_profile()
    spec = ModelSpec(TINY_VIT, dict(TINY_VIT_KWARGS), "vit", (FULL, BlockWidths(1, 8, 10)), {}, 10)
    check_fits(profile, spec)
    with pytest.raises(IncompatibleArtifactError, match="measured for"):
        check_fits(profile, replace(spec, kwargs={**TINY_VIT_KWARGS, "img_size": 16}))
    with pytest.raises(IncompatibleArtifactError, match="blocks"):
        check_fits(profile, replace(spec, blocks=(FULL,) * 3))
    with pytest.raises(IncompatibleArtifactError, match="up to 48"):
        check_fits(profile, replace(spec, blocks=(FULL, BlockWidths(3, 8, 60))))
    with pytest.raises(NotImplementedStageError, match="merges tokens"):
        check_fits(profile, replace(spec, token_merging=TokenMerging("bipartite", (1, 1))))


def test_measured_table_grows_with_width_and_predicts_the_whole_model(tmp_path, tapvits):
    """On a ViT wide enough that the widths, not per-call overheads, set the time: the largest
    widths cost more than the smallest, and the unpruned model's predicted latency is within a
    factor of 2 of its measured one.

    The test machine is shared, and a neighbour's load can stretch any wall-clock measurement
    several-fold, so both sides count this process's CPU time on one thread (what the clock
    option is for), in alternating rounds, each keeping its fastest round (entry by entry
    for the table)."""
    import time

    import torch

    from tapvits_cli.artifacts.model import load_model
    from tapvits_cli.latency.measure import measure_profile

    kwargs = {**TINY_VIT_KWARGS, "embed_dim": 64, "num_heads": 4, "mlp_ratio": 8.0}
    path = tmp_path / "wide.safetensors"
    assert tapvits("create-model", TINY_VIT, *model_args(kwargs), "-o", path).exit_code == 0
    loaded = load_model(path)
    model, spec = loaded.module, loaded.spec
    images = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    profiles, measured = [], []
    with torch.inference_mode():
        for round_ in range(4):
            profiles.append(measure_profile(spec, (64,), mlp_widths=(1, 256, 512), mlp_alignment=1, repeats=1,
                                            warmup=int(round_ == 0), threads=1, clock=time.process_time))
            for run in range(4):
                start = time.process_time()
                model(images)
                if run:
                    measured.append((time.process_time() - start) * 1000.0)
    fastest = replace(profiles[0], **{name: (min(getattr(p, name)[0] for p in profiles),)
                                      for name in ("embed_ms", "head_ms", "block_ms")},
                      attn=BranchTable(profiles[0].attn.widths, np.min([p.attn.median_ms for p in profiles], axis=0)),
                      mlp=BranchTable(profiles[0].mlp.widths, np.min([p.mlp.median_ms for p in profiles], axis=0)))
    assert fastest.attn.median_ms[-1, 0] > fastest.attn.median_ms[0, 0]
    assert fastest.mlp.median_ms[-1, 0] > 2 * fastest.mlp.median_ms[0, 0]
    predicted = predict_latency(fastest, spec.blocks, 64).total_ms
    assert 0.5 < predicted / min(measured) < 2.0, (predicted, measured)


def test_a_pruned_model_profiles_its_unpruned_architecture(tiny_model_file, tmp_path, tapvits):
    """The fingerprint is the architecture's, not the pruned widths: the table covers every plan."""
    from tapvits_cli.artifacts.model import load_model, read_model_spec, write_model
    from tapvits_cli.models.factory import describe_model
    from tapvits_cli.pruning import prune_model

    loaded = load_model(tiny_model_file)
    model, spec = loaded.module, loaded.spec
    pruned = prune_model(model, {"attn": [[0, 2], []], "mlp": [list(range(10)), list(range(30))]})
    pruned_spec = describe_model(pruned, spec.architecture, spec.kwargs)
    pruned_file = tmp_path / "pruned.safetensors"
    write_model(pruned_file, pruned, pruned_spec, params={"seed": 0})
    out = tmp_path / "p.json"
    assert tapvits("profile", pruned_file, "-o", out, *PROFILE_ARGS).exit_code == 0
    profile = read_profile(out)
    assert profile.blocks == (FULL, FULL) and profile.attn.widths == (1, 2, 3)
    prediction = predict_model(read_profile(out), read_model_spec(pruned_file).spec, 4)
    assert prediction.attn_ms[1] == 0.0   # block 1 lost its attention
    assert prediction.total_ms == pytest.approx(prediction.embed_ms + prediction.head_ms + prediction.blocks_ms.sum())


def test_onnxruntime_runtime(tiny_model_file, tmp_path, tapvits, monkeypatch):
    import onnxruntime

    sessions = []

    class Recorded(onnxruntime.InferenceSession):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            sessions.append(self.get_session_options())

    monkeypatch.setattr(onnxruntime, "InferenceSession", Recorded)
    out = tmp_path / "ort.json"
    result = tapvits("profile", tiny_model_file, "-o", out, "--runtime", "onnxruntime", "--batch-sizes", "2",
                     "--widths", "48", "--repeats", "1", "--warmup-runs", "0", "--threads", "1")
    assert result.exit_code == 0, result.stderr
    # one session per configuration: none may spin on the cores while another is timed (measure._onnx_runners)
    assert len(sessions) == 1 + 3 + 1 + 2 + 2   # the emptied block, 3 head counts, 3 MLP widths, embed, head
    assert {o.get_session_config_entry("session.intra_op.allow_spinning") for o in sessions} == {"0"}

    profile = read_profile(out)
    assert (profile.runtime, profile.runtime_version) == ("onnxruntime", onnxruntime.__version__)
    assert profile.mlp.widths == (48,) and profile.attn.widths == (1, 2, 3)
    assert profile.mlp_alignment == 8 and profile.mlp_unaligned.widths == (1, 47)
    assert np.all(profile.mlp_unaligned.median_ms > 0)


def _rewrite(path, tmp_path, change) -> object:
    document = json.loads(path.read_text())
    change(document)
    out = tmp_path / "broken.json"
    out.write_text(json.dumps(document))
    return out


@pytest.mark.parametrize("change, needle", [
    (lambda d: d.pop("attn"), "'attn'"),
    (lambda d: d.pop("hardware"), "'hardware'"),
    (lambda d: d.update(batch_sizes=[4, 1]), "batch_sizes"),
    (lambda d: d["mlp"].update(widths=[1, 48, 24]), "mlp.widths"),
    (lambda d: d["attn"].update(widths=[1, 2, 4]), "architecture has 3"),
    (lambda d: d["fixed"]["embed_ms"].__setitem__(0, -1.0), "fixed.embed_ms"),
    (lambda d: d["fixed"]["head_ms"].__setitem__(1, float("nan")), "NaN is not a JSON number"),
    (lambda d: d["attn"]["median_ms"][0].__setitem__(0, float("inf")), "Infinity is not a JSON number"),
    (lambda d: d["mlp"]["median_ms"].pop(), "mlp.median_ms"),
    # a review: every latency at 1e308 passed, and the predicted totals were Infinity in inspect --json
    (lambda d: d["fixed"]["block_ms"].__setitem__(0, 1e308), "at most 1e+06 ms"),
    (lambda d: d["attn"]["median_ms"][0].__setitem__(0, 1000001.0), "at most 1e+06 ms"),
    (lambda d: d["fixed"].update(block_ms=[1.0]), "fixed.block_ms"),
    (lambda d: d["runtime"].update(threads=True), "runtime.threads"),
    (lambda d: d["runtime"].update(name="tensorrt"), "runtime.name"),
    (lambda d: d.update(tokens=0), "tokens"),
    (lambda d: d["model"]["blocks"][0].update(heads="3"), "model.blocks[0]"),
    (lambda d: d.pop("mlp_unaligned"), "'mlp_unaligned' must be present exactly when"),
    (lambda d: d.update(mlp_alignment=1), "'mlp_unaligned' must be present exactly when"),
    (lambda d: d.update(mlp_alignment=True), "mlp_alignment"),
    (lambda d: d.update(mlp_alignment=0), "mlp_alignment"),
    (lambda d: d.update(mlp_alignment=16), "'mlp.widths' holds [8, 24], not multiples of 'mlp_alignment' 16"),
    (lambda d: d["mlp_unaligned"].update(widths=[1, 8, 23, 47]), "'mlp_unaligned.widths' holds [8], multiples"),
    (lambda d: d["mlp_unaligned"].update(widths=[1, 7, 23, 49]), "architecture has 48"),
    (lambda d: d["mlp_unaligned"]["median_ms"].pop(), "mlp_unaligned.median_ms"),
    (lambda d: d["mlp_unaligned"]["median_ms"][0].__setitem__(1, 0.0), "mlp_unaligned.median_ms"),
    (lambda d: d["mlp_unaligned"].pop("widths"), "mlp_unaligned.widths"),
])
def test_corrupt_profiles_are_rejected(profile_file, tmp_path, tapvits, change, needle):
    broken = _rewrite(profile_file, tmp_path, change)
    for command in ("validate", "inspect"):
        result = tapvits(command, broken)
        assert_one_line_failure(result, ExitCode.INVALID_ARTIFACT)
        assert needle in result.stderr, result.stderr


def test_a_profile_without_the_alignment_reads_as_one_curve(profile_file, tmp_path, tapvits):
    """Profiles written before ``mlp_alignment`` existed hold one MLP curve: they still validate, inspect and
    predict, every width from ``mlp``."""
    def one_curve(document):
        document.pop("mlp_alignment"), document.pop("mlp_unaligned")

    old = _rewrite(profile_file, tmp_path, one_curve)
    assert tapvits("validate", old).stdout == f"{old}: ok (profile v1)\n"
    profile, current = read_profile(old), read_profile(profile_file)
    assert profile.mlp_alignment == 1 and profile.mlp_unaligned is None and profile.mlp.widths == current.mlp.widths
    prediction = predict_latency(profile, [BlockWidths(0, 8, 23), BlockWidths(0, 8, 24)], 4)
    np.testing.assert_allclose(prediction.mlp_ms, profile.mlp.at(np.array([23, 24]), 1) - profile.block_ms[1])
    titles = [table["title"] for table in tapvits("inspect", old, "--json").json()["tables"]]
    assert titles[-1] == "MLP-only block (ms) by hidden width" and len(titles) == 3


def test_truncated_and_newer_profiles(profile_file, tmp_path, tapvits):
    cut = tmp_path / "cut.json"
    cut.write_bytes(profile_file.read_bytes()[:200])
    assert_one_line_failure(tapvits("validate", cut), ExitCode.INVALID_ARTIFACT)
    newer = _rewrite(profile_file, tmp_path, lambda d: d.update({"tapvits.version": "2"}))
    assert_one_line_failure(tapvits("inspect", newer), ExitCode.INCOMPATIBLE)


def test_cli_errors_are_one_line_with_documented_codes(profiled, tmp_path, tapvits):
    tiny_model_file, profile_file = profiled
    out = tmp_path / "x.json"
    for args, code, needle in [
        (("--batch-sizes", "0,1"), ExitCode.USAGE, "--batch-sizes"),
        (("--widths", "1,96"), ExitCode.USAGE, "1..48"),
        (("--widths", "8,12,20"), ExitCode.USAGE, "MLP widths must be multiples of --mlp-alignment 8, not 12, 20:"),
        (("--widths", "1,24", "--mlp-alignment", "4"), ExitCode.USAGE, "multiples of --mlp-alignment 4, not 1:"),
        (("--mlp-alignment", "0"), ExitCode.USAGE, "--mlp-alignment"),
        (("--mlp-alignment", "64"), ExitCode.USAGE, "--mlp-alignment 64 exceeds the architecture's 48"),
        (("--repeats", "0"), ExitCode.USAGE, "--repeats"),
    ]:
        result = tapvits("profile", tiny_model_file, "-o", out, *args)
        assert_one_line_failure(result, code)
        assert needle in result.stderr and not out.exists()
    result = tapvits("profile", profile_file, "-o", out)   # a profile is not a model
    assert_one_line_failure(result, ExitCode.INCOMPATIBLE)
    assert_one_line_failure(tapvits("profile", tiny_model_file, "-o", tiny_model_file), ExitCode.USAGE)


def test_swin_is_not_supported_yet(tmp_path, tapvits):
    swin = tmp_path / "swin.safetensors"
    kwargs = {"img_size": 32, "patch_size": 2, "window_size": 4, "embed_dim": 24, "depths": [2, 2],
              "num_heads": [2, 4], "mlp_ratio": 2.0, "in_chans": 1, "num_classes": 10}
    assert tapvits("create-model", "swin_tiny_patch4_window7_224", *model_args(kwargs), "-o", swin).exit_code == 0
    result = tapvits("profile", swin, "-o", tmp_path / "p.json")
    assert_one_line_failure(result, ExitCode.NOT_IMPLEMENTED)
    assert "family 'swin'" in result.stderr and not (tmp_path / "p.json").exists()


# timm ViT layouts the device's ONNX graphs must reproduce (each on the tiny ViT's 2 blocks of 3 heads).
LAYOUTS = {
    "deit": {},
    "registers, layer scale, no qkv bias": {"reg_tokens": 2, "init_values": 0.1, "qkv_bias": False},
    "no class token, mean pooling, fc_norm": {"class_token": False, "global_pool": "avg", "fc_norm": True},
    "position embedding without the prefix": {"reg_tokens": 1, "no_embed_class": True},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_onnx_graphs_compute_what_the_torch_model_computes(layout):
    """The graphs `profile --runtime onnxruntime` times, fed a pruned model's own weights, give its outputs
    (stem, every block with an emptied branch among them, tail), and the architecture read from the
    file's tensor shapes alone is the one timm builds."""
    import onnxruntime
    import torch

    from tapvits_cli.latency.architecture import read_architecture
    from tapvits_cli.latency.measure import unpruned_architecture
    from tapvits_cli.latency.onnx_graphs import blocks_graph, stem_graph, tail_graph
    from tapvits_cli.models.factory import create_model, describe_model
    from tapvits_cli.models.families import vit
    from tapvits_cli.pruning import prune_model

    kwargs = {**TINY_VIT_KWARGS, **LAYOUTS[layout]}
    torch.manual_seed(0)
    model = create_model(TINY_VIT, kwargs).eval()
    with torch.no_grad():
        for parameter in model.parameters():   # weights far from their initial values: every part matters
            parameter.normal_(std=0.3)
    model = prune_model(model, {"attn": [[0, 2], []], "mlp": [list(range(10)), list(range(30))]}).eval()
    spec = describe_model(model, TINY_VIT, kwargs)
    state = {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}
    arch = read_architecture(spec, {name: array.shape for name, array in state.items()})
    assert arch == unpruned_architecture(spec) and arch.blocks == (FULL, FULL)

    def run(graph: bytes, x: torch.Tensor) -> np.ndarray:
        session = onnxruntime.InferenceSession(graph, providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]

    weights = lambda name, shape: state[name]   # noqa: E731
    sequence = vit.block_sequence(model)
    images = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = sequence.stem(images)
        hidden = tokens
        for block in sequence.blocks:
            hidden = block(hidden)
        logits = sequence.tail(hidden)
    np.testing.assert_allclose(run(stem_graph(arch, weights), images), tokens.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(run(blocks_graph(arch, spec.blocks, arch.tokens, weights), tokens), hidden.numpy(),
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(run(tail_graph(arch, arch.tokens, weights), hidden), logits.numpy(), atol=1e-5, rtol=0)


def test_architecture_reader_refuses_layouts_it_does_not_build(tmp_path, tapvits):
    from tapvits_cli.artifacts.model import read_model_spec
    from tapvits_cli.latency.architecture import read_architecture

    path = tmp_path / "qknorm.safetensors"
    assert tapvits("create-model", TINY_VIT, *model_args({**TINY_VIT_KWARGS, "qk_norm": True}), "-o", path).exit_code == 0
    read = read_model_spec(path)
    artifact, spec = read.artifact, read.spec
    with pytest.raises(NotImplementedStageError, match="k_norm"):
        read_architecture(spec, {name: info.shape for name, info in artifact.tensors.items()})
    result = tapvits("profile", path, "-o", tmp_path / "p.json", "--runtime", "onnxruntime")
    assert_one_line_failure(result, ExitCode.NOT_IMPLEMENTED)
    assert "--runtime torch" in result.stderr and not (tmp_path / "p.json").exists()


def _rewrite_header(path, out, change) -> None:
    """A copy of the safetensors file ``path`` whose JSON header went through ``change`` (data untouched)."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    change(header)
    text = json.dumps(header).encode()
    out.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length:])


@pytest.mark.parametrize("change, needle", [
    # same number of elements, so the file stays readable: only the layout lies
    (lambda h: h["blocks.0.mlp.fc1.weight"].update(shape=[24, 48]), "blocks.0.mlp.fc1.weight"),
    (lambda h: h["patch_embed.proj.weight"].update(shape=[24, 4]), "4-dimensional 'patch_embed.proj.weight'"),
    (lambda h: h["pos_embed"].update(shape=[1, 24, 17]), "pos_embed"),
    (lambda h: h["__metadata__"].update({"model.blocks": json.dumps([{"heads": 3, "head_dim": 0, "mlp_hidden": 48}]
                                                                    * 2)}), "head_dim of 0"),
    (lambda h: h["__metadata__"].update({"model.kwargs": json.dumps({**TINY_VIT_KWARGS, "mlp_ratio": "2"})}),
     "mlp_ratio"),
])
def test_profile_on_onnxruntime_refuses_headers_that_lie(tiny_model_file, tmp_path, tapvits, change, needle):
    """The device's architecture comes from the header alone: one that contradicts itself is refused (one line,
    exit 3 or 7), never built into graphs of the wrong shape."""
    broken = tmp_path / "broken.safetensors"
    _rewrite_header(tiny_model_file, broken, change)
    out = tmp_path / "p.json"
    result = tapvits("profile", broken, "-o", out, "--runtime", "onnxruntime", "--repeats", "1", "--warmup-runs", "0")
    assert result.exit_code in (ExitCode.INVALID_ARTIFACT, ExitCode.NOT_IMPLEMENTED), result.stderr
    assert_one_line_failure(result, result.exit_code)
    assert needle in result.stderr and not out.exists()


def test_graph_bytes_are_a_valid_onnx_model():
    """The hand-written protobuf is what the onnx package itself reads and checks (shape inference included)."""
    import onnx

    from tapvits_cli.latency.architecture import Architecture
    from tapvits_cli.latency.onnx_graphs import OPSET, blocks_graph, random_weights, stem_graph, tail_graph

    arch = Architecture(blocks=(FULL, FULL), tokens=19, dim=24, input_size=(1, 8, 8), patch_size=2, prefix_tokens=3,
                        layer_scale=True, num_classes=10)
    for graph in (stem_graph(arch, random_weights(0)), tail_graph(arch, 19, random_weights(0)),
                  blocks_graph(arch, (FULL, BlockWidths(0, 8, 0), BlockWidths(2, 8, 0)), 19, random_weights(0)),
                  blocks_graph(arch, (BlockWidths(0, 8, 0),) * 2, 19, random_weights(0))):   # only an Identity
        model = onnx.load_from_string(graph)
        onnx.checker.check_model(model, full_check=True)
        assert model.opset_import[0].version == OPSET and model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
