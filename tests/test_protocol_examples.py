"""Every artifact kind: a small valid example made by the tool, and each documented way to break it.

protocol/README.md points here: these are the protocol's examples, checked.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from tapvits_cli.artifacts.containers import open_file
from tapvits_cli.artifacts.files import atomic_write
from tapvits_cli.artifacts.kinds import all_kinds, read_artifact
from tapvits_cli.errors import ExitCode, IncompatibleArtifactError


def rewrite_metadata(src, dst, **changes):
    """Copy a safetensors artifact with some metadata keys changed (None deletes)."""
    meta = dict(open_file(src).metadata)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    save_file(load_file(str(src)), str(dst), metadata=meta)


def assert_one_line_failure(result, code):
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tapvits: error:"), result.stderr


def test_model_example_is_valid_and_inspectable(tiny_model_file, tapvits):
    result = tapvits("validate", tiny_model_file)
    assert result.exit_code == 0 and result.stdout == f"{tiny_model_file}: ok (model v2)\n"
    human = tapvits("inspect", tiny_model_file)
    assert human.exit_code == 0
    for needle in ("model", "vit_tiny_patch16_224", "blocks", "mlp_hidden", "parameters"):
        assert needle in human.stdout
    document = tapvits("inspect", tiny_model_file, "--json").json()
    assert document["kind"] == "model" and document["version"] == 2
    assert document["figures"]["family"] == "vit"
    assert document["tables"][0]["rows"] == [[0, 3, 8, 48], [1, 3, 8, 48]]
    assert document["params"]["seed"] == 0
    assert document["tensors"]["head.weight"]["shape"] == [10, 24]


def test_truncated_file(tiny_model_file, tmp_path, tapvits):
    data = tiny_model_file.read_bytes()
    for cut in (4, 200, len(data) - 10):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        for command in ("validate", "inspect"):
            result = tapvits(command, bad)
            assert_one_line_failure(result, ExitCode.INVALID_ARTIFACT)
    assert "truncated" in result.stderr


def test_random_and_foreign_files(tmp_path, tapvits):
    import numpy as np

    rng = np.random.default_rng(0)
    random_file = tmp_path / "random.bin"
    random_file.write_bytes(rng.bytes(4096))
    plain = tmp_path / "plain.safetensors"
    save_file({"w": __import__("torch").zeros(3)}, str(plain))  # safetensors, but not ours
    json_file = tmp_path / "x.json"
    json_file.write_text('{"hello": 1}')
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    for path in (random_file, plain, json_file, empty):
        assert_one_line_failure(tapvits("validate", path), ExitCode.INVALID_ARTIFACT)
    assert "not a tapvits artifact" in tapvits("validate", plain).stderr


def test_newer_version_is_incompatible(tiny_model_file, tmp_path, tapvits):
    newer = tmp_path / "newer.safetensors"
    rewrite_metadata(tiny_model_file, newer, tapvits__version="3")
    for command in ("validate", "inspect"):
        result = tapvits(command, newer)
        assert_one_line_failure(result, ExitCode.INCOMPATIBLE)
    assert "v3" in result.stderr and "reads up to v2" in result.stderr


def test_version_1_model_is_read_with_its_own_weights_hash(tiny_model_file, tmp_path, tapvits):
    """A v1 model hashed its weights with torch's dtype strings and Python's tuple repr; v2 readers keep that rule."""
    from tapvits_cli.artifacts.digests import tensors_sha256

    tensors = load_file(str(tiny_model_file))
    old = tmp_path / "v1.safetensors"
    rewrite_metadata(tiny_model_file, old, tapvits__version="1", model__timm_version=None,
                     model__weights_sha256=tensors_sha256(tensors, "legacy"))
    assert tapvits("validate", old).stdout == f"{old}: ok (model v1)\n"
    mislabelled = tmp_path / "v2-legacy-hash.safetensors"   # a v2 file must use the container rule
    rewrite_metadata(tiny_model_file, mislabelled, model__weights_sha256=tensors_sha256(tensors, "legacy"))
    assert_one_line_failure(tapvits("validate", mislabelled), ExitCode.INVALID_ARTIFACT)
    unversioned = tmp_path / "no-timm.safetensors"   # v2 records the timm version its tensor names come from
    rewrite_metadata(tiny_model_file, unversioned, model__timm_version=None)
    assert_one_line_failure(tapvits("validate", unversioned), ExitCode.INVALID_ARTIFACT)


def test_unknown_keys_are_ignored(tiny_model_file, tmp_path, tapvits):
    extended = tmp_path / "extended.safetensors"
    rewrite_metadata(tiny_model_file, extended, model__future_option="x", other__thing="y")
    assert tapvits("validate", extended).exit_code == 0


@pytest.mark.parametrize("key", ["tapvits.params", "model.blocks", "model.weights_sha256", "model.architecture"])
def test_missing_required_key(tiny_model_file, tmp_path, tapvits, key):
    broken = tmp_path / "broken.safetensors"
    rewrite_metadata(tiny_model_file, broken, **{key.replace(".", "__"): None})
    result = tapvits("validate", broken)
    assert_one_line_failure(result, ExitCode.INVALID_ARTIFACT)
    assert key in result.stderr


def test_inconsistent_content(tiny_model_file, tmp_path, tapvits):
    wrong_widths = tmp_path / "widths.safetensors"
    blocks = json.loads(open_file(tiny_model_file).metadata["model.blocks"])
    blocks[0]["mlp_hidden"] = 40
    rewrite_metadata(tiny_model_file, wrong_widths, model__blocks=json.dumps(blocks))
    assert_one_line_failure(tapvits("validate", wrong_widths), ExitCode.INVALID_ARTIFACT)

    flipped = tmp_path / "flipped.safetensors"
    data = bytearray(tiny_model_file.read_bytes())
    data[-3] ^= 0xFF  # a weight byte: structure intact, content corrupted
    flipped.write_bytes(bytes(data))
    result = tapvits("validate", flipped)
    assert_one_line_failure(result, ExitCode.INVALID_ARTIFACT)
    assert "weights_sha256" in result.stderr


def test_unknown_kind_and_wrong_kind(tiny_model_file, tmp_path, tapvits):
    alien = tmp_path / "alien.safetensors"
    rewrite_metadata(tiny_model_file, alien, tapvits__kind="hologram")
    result = tapvits("validate", alien)
    assert_one_line_failure(result, ExitCode.INVALID_ARTIFACT)
    assert "unknown artifact kind 'hologram'" in result.stderr
    with pytest.raises(IncompatibleArtifactError, match="expected a gmm artifact, got a model"):
        read_artifact(tiny_model_file, expect="gmm")


def test_validate_many_files_reports_each(tiny_model_file, tmp_path, tapvits):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage!" * 8)
    result = tapvits("validate", tiny_model_file, bad)
    assert result.exit_code == ExitCode.INVALID_ARTIFACT
    assert result.stdout == f"{tiny_model_file}: ok (model v2)\n"
    document = tapvits("validate", "--json", tiny_model_file, bad).json()
    assert [r["valid"] for r in document["results"]] == [True, False]


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.safetensors"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_every_registered_kind_has_a_protocol_document():
    from pathlib import Path

    protocol = Path(__file__).resolve().parents[1] / "protocol"
    index = (protocol / "README.md").read_text()
    for name, spec in all_kinds().items():
        assert (protocol / f"{name}.md").is_file(), name
        assert f"| `{name}` | {spec.format} | {spec.version} |" in index


def test_atomic_write_gives_ordinary_permissions(tmp_path):
    import os

    target = tmp_path / "out.bin"
    with atomic_write(target) as tmp:
        tmp.write_bytes(b"x")
    mask = os.umask(0)
    os.umask(mask)
    assert (target.stat().st_mode & 0o777) == (0o666 & ~mask)


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999", "1" + "0" * 400])
def test_json_in_an_artifact_is_strict_json(number, tiny_model_file, tmp_path, tapvits):
    """Python's parser takes NaN, Infinity, 1e999 and integers of any size; strict readers of ``--json`` output,
    and the first float conversion of such an integer, would not."""
    edited = tmp_path / "edited.safetensors"
    rewrite_metadata(tiny_model_file, edited, tapvits__params='{"seed": %s}' % number)
    for command in ("validate", "inspect"):
        refused = tapvits("--json", command, edited)
        assert refused.exit_code == ExitCode.INVALID_ARTIFACT, (command, refused.stderr)
        assert any(reason in refused.stderr for reason in ("not a JSON number", "beyond a 64-bit"))


def test_a_json_member_named_twice_is_refused_wherever_json_is_read(tiny_model_file, tmp_path, tapvits):
    """Parsers disagree on which of two equal member names wins; a file that two readers read differently is
    refused: in a header's JSON text, and in the safetensors header itself (a tensor's entry given twice)."""
    edited = tmp_path / "edited.safetensors"
    rewrite_metadata(tiny_model_file, edited, tapvits__params='{"seed": 1, "seed": 2}')
    assert_one_line_failure(tapvits("validate", edited), ExitCode.INVALID_ARTIFACT)
    assert "member 'seed' appears twice" in tapvits("--json", "inspect", edited).stderr
    data = tiny_model_file.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = data[8:8 + length].decode().rstrip()
    name = next(iter(json.loads(header).keys() - {"__metadata__"}))
    entry = json.dumps({name: json.loads(header)[name]})[1:-1]
    doubled = ("{" + entry + "," + header[1:]).encode()
    doubled += b" " * (-len(doubled) % 8)
    (tmp_path / "doubled.safetensors").write_bytes(len(doubled).to_bytes(8, "little") + doubled + data[8 + length:])
    refused = tapvits("validate", tmp_path / "doubled.safetensors")
    assert_one_line_failure(refused, ExitCode.INVALID_ARTIFACT)
    assert "appears twice" in refused.stderr


@pytest.mark.parametrize("created", ["yesterday", "2026-12-03T15:30:49+01:00", "2026-12-03T15:30:49\x1b]0;x\x07", "",
                                     "2026-W49-4T15:30:49Z", "2026-12-03 15:30:49+00:00", "2026-02-30T15:30:49Z"])
def test_created_is_an_iso_8601_time_in_utc(created, tiny_model_file, tmp_path, tapvits):
    edited = tmp_path / "edited.safetensors"
    rewrite_metadata(tiny_model_file, edited, tapvits__created=created)
    refused = tapvits("validate", edited)
    assert_one_line_failure(refused, ExitCode.INVALID_ARTIFACT)
    assert "'tapvits.created' is not an ISO 8601 time in UTC" in refused.stderr


@pytest.mark.parametrize("created", ["2026-12-03T15:30:49Z", "2026-12-03T15:30:49.123456+00:00"])
def test_created_may_say_utc_as_z_and_carry_a_fraction(created, tiny_model_file, tmp_path, tapvits):
    edited = tmp_path / "edited.safetensors"
    rewrite_metadata(tiny_model_file, edited, tapvits__created=created)
    assert tapvits("validate", edited).exit_code == 0


def test_a_metric_set_column_of_unwritten_chunks_is_refused_before_it_is_allocated(tmp_path, tapvits):
    """A 12 KB file declaring 10^11 ids: read whole, the column was a 745 GiB allocation (exit 1)."""
    import h5py

    edited = tmp_path / "metric-set.h5"
    shutil.copyfile(Path(__file__).parent.parent / "protocol" / "conformance" / "files" / "metric-set.h5", edited)
    with h5py.File(edited, "r+") as handle:
        del handle["selection/ids"]
        handle["selection"].create_dataset("ids", shape=(10**11,), dtype=np.int64, chunks=(1 << 20,))
    refused = tapvits("validate", edited)
    assert_one_line_failure(refused, ExitCode.INVALID_ARTIFACT)
    assert "'selection/ids' declares 100000000000 values but the file does not store them all" in refused.stderr
