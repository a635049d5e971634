"""A second reader of tapvits artifacts, written from protocol/ alone.

It deliberately shares no code with ``tapvits_cli`` (it must not import it): every
container is parsed, every hash recomputed and every rule checked from the text of
protocol/*.md, with the standard library, NumPy, h5py and (for the digits pixels a
dataset fingerprint covers) scikit-learn's bundled data. ``tests/test_conformance.py``
checks that it reaches the same verdict as ``tapvits validate`` on every file of the
conformance kit and of a real run: where the two disagree, the protocol text is
incomplete or one of them is wrong.

Not covered (they need torch or a private dataset): rebuilding a model's module, token
merging, a GMM's rule 3 and assigned counts, ONNX exports.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

NEWEST = {"model": 2, "gmm": 3, "features": 1, "metric-set": 1, "scores": 1, "plan": 1, "report": 1, "profile": 1}
HEADER_KEYS = ("kind", "version", "producer", "producer_version", "created", "inputs", "params")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# README "Tensor hash": the container's dtype names, and the legacy rule's spelling of each.
DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
          "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
LEGACY_DTYPES = {"F64": "torch.float64", "F32": "torch.float32", "F16": "torch.float16", "BF16": "torch.bfloat16",
                 "I64": "torch.int64", "I32": "torch.int32", "I16": "torch.int16", "I8": "torch.int8",
                 "U8": "torch.uint8", "BOOL": "torch.bool"}


class Invalid(Exception):
    """Exit code 3: not a valid artifact."""
    code = 3


class Incompatible(Exception):
    """Exit code 4: a valid artifact of a version this reader does not know."""
    code = 4


def strict_json(text: str) -> Any:
    """README "Compact JSON": NaN, Infinity, numbers beyond a double, integers beyond 64 bits and a member
    named twice in one object are refused."""
    def refuse(constant):
        raise ValueError(constant)

    def finite(number: str) -> float:
        value = float(number)
        if value in (float("inf"), float("-inf")):
            raise ValueError(number)
        return value

    def int64(number: str) -> int:
        value = int(number)
        if not -2 ** 63 <= value < 2 ** 63:
            raise ValueError(number)
        return value

    def one_of_each(pairs):
        names = [name for name, _ in pairs]
        if len(set(names)) < len(names):
            raise ValueError("a member named twice")
        return dict(pairs)

    return json.loads(text, parse_constant=refuse, parse_float=finite, parse_int=int64, object_pairs_hook=one_of_each)


def _is_fraction(text: str) -> bool:
    return text == "" or (text[0] == "." and 1 <= len(text) - 1 <= 6 and text[1:].isascii() and text[1:].isdigit())


def require(condition: bool, message: str) -> None:
    if not condition:
        raise Invalid(message)


# -- README "Compact JSON" ----------------------------------------------------------------------

def compact_json(value: Any, comma: str = ",", colon: str = ":") -> str:
    """The README's compact JSON, encoded by hand from its rules (not by a JSON library).

    ``comma`` and ``colon`` are the separators: datasets.md's fingerprint spaces them.
    """
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        require(math.isfinite(value), "NaN or infinity in JSON")
        return repr(value)   # shortest round-trip digits; repr spells exponents as the rule says
    if isinstance(value, str):
        return '"' + "".join(_escape(c) for c in value) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + comma.join(compact_json(v, comma, colon) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + comma.join(compact_json(k) + colon + compact_json(value[k], comma, colon)
                                for k in sorted(value)) + "}"
    raise TypeError(type(value))


_SHORT = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _escape(char: str) -> str:
    if char in _SHORT:
        return _SHORT[char]
    point = ord(char)
    if 0x20 <= point <= 0x7E:
        return char
    if point > 0xFFFF:
        point -= 0x10000
        return f"\\u{0xD800 + (point >> 10):04x}\\u{0xDC00 + (point & 0x3FF):04x}"
    return f"\\u{point:04x}"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- containers -----------------------------------------------------------------------------------

@dataclass
class Artifact:
    path: Path
    container: str
    strings: dict[str, str]                       # header and kind keys, all strings
    kind: str = ""
    version: int = 0
    inputs: dict[str, dict] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, tuple[str, tuple[int, ...], bytes]] = field(default_factory=dict)   # safetensors
    body: dict[str, Any] = field(default_factory=dict)                                      # JSON

    def array(self, name: str) -> np.ndarray:
        dtype, shape, raw = self.tensors[name]
        return np.frombuffer(raw, dtype=DTYPES[dtype]).reshape(shape)

    def json_key(self, key: str, kind: type) -> Any:
        require(key in self.strings, f"required key '{key}' is missing")
        try:
            value = strict_json(self.strings[key])
        except ValueError:
            raise Invalid(f"key '{key}' is not JSON") from None
        require(isinstance(value, kind) and not isinstance(value, bool), f"key '{key}' is not a JSON {kind.__name__}")
        return value

    def integer_key(self, key: str) -> int:
        require(key in self.strings, f"required key '{key}' is missing")
        text = self.strings[key]
        require(text.isascii() and text.lstrip("-").isdigit(), f"key '{key}' is not a decimal integer")
        return int(text)


def open_artifact(path: Path) -> Artifact:
    data = path.read_bytes()
    if data.startswith(HDF5_SIGNATURE):
        return _open_hdf5(path)
    stripped = data.lstrip()
    if stripped.startswith(b"{"):
        try:
            body = strict_json(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise Invalid("not JSON") from None
        require(isinstance(body, dict), "not a JSON object")
        strings = {k: v for k, v in body.items() if k.startswith("tapvits.")}
        require(all(isinstance(v, str) for v in strings.values()), "JSON header members must be strings")
        return Artifact(path, "json", strings, body=body)
    return _open_safetensors(path, data)


def _open_safetensors(path: Path, data: bytes) -> Artifact:
    require(len(data) >= 8, "not an artifact (too short)")
    length = int.from_bytes(data[:8], "little")
    require(8 + length <= len(data), "not an artifact or truncated (header beyond the file)")
    try:
        header = strict_json(data[8:8 + length].decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise Invalid("not a safetensors header") from None
    require(isinstance(header, dict), "safetensors header is not an object")
    metadata = header.pop("__metadata__", {}) or {}
    require(isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values()),
            "safetensors metadata values must be strings")
    tensors, spans = {}, []
    for name, info in header.items():
        require(isinstance(info, dict) and info.get("dtype") in {**DTYPES, "BF16": None}, f"tensor {name}: bad dtype")
        shape, (start, end) = tuple(info["shape"]), info["data_offsets"]
        itemsize = 2 if info["dtype"] == "BF16" else np.dtype(DTYPES[info["dtype"]]).itemsize
        require(end - start == itemsize * math.prod(shape), f"tensor {name}: size disagrees with its shape")
        spans.append((start, end))
        tensors[name] = (info["dtype"], shape, data[8 + length + start:8 + length + end])
    covered = 0
    for start, end in sorted(spans):
        require(start == covered, "tensor data offsets leave a gap or overlap")
        covered = end
    require(8 + length + covered == len(data), "file size disagrees with the tensor offsets (truncated or padded)")
    return Artifact(path, "safetensors", dict(metadata), tensors=tensors)


def _open_hdf5(path: Path) -> Artifact:
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError:
        raise Invalid("HDF5 file does not open") from None
    with handle:
        names: list[str] = []
        handle.visit_links(names.append)   # README "Containers": every value must be in the file itself
        for name in names:
            link = handle.get(name, getlink=True)
            require(not isinstance(link, h5py.ExternalLink), f"{name} is an external link")
            if isinstance(link, h5py.HardLink) and isinstance(handle[name], h5py.Dataset):
                dataset = handle[name]
                require(not dataset.is_virtual and dataset.external is None, f"{name} keeps its values in another file")
                require(dataset.id.get_create_plist().get_nfilters() == 0, f"{name} is filtered")
                require(dataset.id.get_storage_size() >= dataset.nbytes, f"{name} does not store all its values")
        strings = {key: _text(value) for key, value in handle.attrs.items()}
    return Artifact(path, "hdf5", strings)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- README: the common header, then the kind ----------------------------------------------------

def read(path: str | Path) -> Artifact:
    """Every check a consumer MUST make; raises :class:`Invalid` or :class:`Incompatible`."""
    artifact = open_artifact(Path(path))
    s = artifact.strings
    require("tapvits.kind" in s, "not a tapvits artifact (no tapvits.kind)")
    missing = [k for k in HEADER_KEYS if f"tapvits.{k}" not in s]
    require(not missing, f"header lacks {missing}")
    version = s["tapvits.version"]
    require(version.isascii() and version.isdigit() and int(version) >= 1, "tapvits.version is not an integer >= 1")
    try:
        inputs, params = strict_json(s["tapvits.inputs"]), strict_json(s["tapvits.params"])
    except ValueError:
        raise Invalid("tapvits.inputs / tapvits.params are not JSON") from None
    created = s["tapvits.created"]   # README "Common header": YYYY-MM-DDTHH:MM:SS[.ffffff], then Z or +00:00
    try:
        utc = (len(created) >= 20 and created.isascii() and created[10] == "T"
               and (created.endswith("Z") or created.endswith("+00:00"))
               and datetime.datetime.strptime(created[:19], "%Y-%m-%dT%H:%M:%S") is not None
               and _is_fraction(created[19:].removesuffix("Z").removesuffix("+00:00")))
    except ValueError:
        utc = False
    require(utc, "tapvits.created is not a UTC time")
    require(isinstance(inputs, dict) and isinstance(params, dict), "inputs and params must be JSON objects")
    for role, entry in inputs.items():
        require(isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("sha256", "kind", "name")),
                f"lineage entry {role} is malformed")
    artifact.kind, artifact.version, artifact.inputs, artifact.params = s["tapvits.kind"], int(version), inputs, params
    require(artifact.kind in NEWEST, f"unknown kind {artifact.kind!r}")
    if artifact.version > NEWEST[artifact.kind]:
        raise Incompatible(f"{artifact.kind} v{artifact.version} is newer than v{NEWEST[artifact.kind]}")
    container = {"model": "safetensors", "gmm": "safetensors", "scores": "safetensors", "plan": "safetensors",
                 "features": "hdf5", "metric-set": "hdf5", "report": "json", "profile": "json"}[artifact.kind]
    require(artifact.container == container, f"a {artifact.kind} lives in {container}")
    CHECKS[artifact.kind](artifact)
    return artifact


def verdict(path: str | Path) -> int:
    """The exit code ``tapvits validate`` must give: 0 valid, 3 invalid, 4 incompatible."""
    try:
        read(path)
    except (Invalid, Incompatible) as exc:
        return exc.code
    return 0


def tensor_sha256(artifact: Artifact, names, rule: str) -> str:
    """README "Tensor hash" over the stored bytes of ``names``."""
    digest = hashlib.sha256()
    for name in sorted(names, key=lambda n: n.encode("utf-8")):
        dtype, shape, raw = artifact.tensors[name]
        if rule == "container":
            label = f"{name}|{dtype}|{compact_json(list(shape))}|"
        else:
            dims = ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "")
            label = f"{name}|{LEGACY_DTYPES[dtype]}|({dims})|"
        digest.update(label.encode("utf-8"))
        digest.update(raw)
    return digest.hexdigest()


def _finite(array: np.ndarray) -> bool:
    return bool(np.isfinite(array).all()) if array.dtype.kind == "f" else True


# -- model.md ------------------------------------------------------------------------------------

def blocks_of(value: Any) -> list[dict]:
    require(isinstance(value, list), "blocks must be a list")
    for block in value:
        require(isinstance(block, dict) and all(isinstance(block.get(k), int) and not isinstance(block.get(k), bool)
                                                and block[k] >= 0 for k in ("heads", "head_dim", "mlp_hidden")),
                "blocks entries need integer heads, head_dim, mlp_hidden >= 0")
    return value


# model.md "Rebuilding": kwargs that would make timm fetch or read weights or files
LOADING_KWARGS = {"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict", "pretrained_filter_fn",
                  "pretrained_model_args", "checkpoint_path", "cache_dir", "model_cfg", "feature_cfg", "features_only",
                  "kwargs_filter", "scriptable", "exportable", "no_jit", "device", "dtype"}


def check_model(a: Artifact) -> None:
    for key in ("architecture", "family", "weights_sha256") + (("timm_version",) if a.version >= 2 else ()):
        require(f"model.{key}" in a.strings, f"required key 'model.{key}' is missing")
    require(not LOADING_KWARGS & set(a.json_key("model.kwargs", dict)), "model.kwargs would load weights or files")
    blocks = blocks_of(a.json_key("model.blocks", list))
    preprocessing = a.json_key("model.preprocessing", dict)
    num_classes = a.integer_key("model.num_classes")
    parameters = a.integer_key("model.parameters")
    require(num_classes >= 0, "model.num_classes is negative")
    if "model.class_names" in a.strings:
        names = a.json_key("model.class_names", list)
        require(all(isinstance(n, str) for n in names) and len(names) == num_classes, "model.class_names")
    size = preprocessing.get("input_size")
    require(isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) and v >= 1 for v in size),
            "model.preprocessing.input_size")
    for key in ("mean", "std"):
        values = preprocessing.get(key)
        require(isinstance(values, list) and len(values) == size[0]
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values), f"preprocessing.{key}")
    require(min(preprocessing["std"]) > 0 and preprocessing.get("interpolation") in ("bilinear", "bicubic", "nearest"),
            "model.preprocessing std/interpolation")
    require(max(size[1:]) <= 8192, "input larger than 8192 pixels a side")
    rule = "container" if a.version >= 2 else "legacy"
    require(tensor_sha256(a, a.tensors, rule) == a.strings["model.weights_sha256"],
            "weights do not match model.weights_sha256")
    require(all(_finite(a.array(n)) for n, (dtype, _, _) in a.tensors.items() if dtype != "BF16"),
            "a weight is NaN or infinite")
    if a.strings["model.family"] == "vit":
        _check_vit(a, blocks, num_classes, size, parameters)


def _check_vit(a: Artifact, blocks: list[dict], num_classes: int, size: list[int], parameters: int) -> None:
    """model.md "Rebuilding" for a ViT: every block's tensors have its widths' shapes, nothing else counts."""
    shapes = {name: shape for name, (_, shape, _) in a.tensors.items()}
    width, channels = shapes["patch_embed.proj.weight"][:2]
    require(channels == size[0], "model.preprocessing channels differ from the patch embedding's")
    for i, block in enumerate(blocks):
        inner = block["heads"] * block["head_dim"]
        expected = {f"blocks.{i}.attn.qkv.weight": (3 * inner, width), f"blocks.{i}.attn.proj.weight": (width, inner),
                    f"blocks.{i}.mlp.fc1.weight": (block["mlp_hidden"], width),
                    f"blocks.{i}.mlp.fc2.weight": (width, block["mlp_hidden"])}
        for name, shape in expected.items():
            removed = (block["heads"] == 0) if ".attn." in name else (block["mlp_hidden"] == 0)
            require((name not in shapes) if removed else shapes.get(name) == shape,
                    f"tensor {name} does not fit model.blocks")
    require(not any(n.startswith(f"blocks.{len(blocks)}.") for n in shapes), "more blocks than model.blocks")
    head = shapes.get("head.weight")
    require((head is None and num_classes == 0) or head == (num_classes, width), "head does not fit model.num_classes")
    require(sum(math.prod(s) for s in shapes.values()) == parameters, "model.parameters differs from the tensors")


# -- gmm.md ---------------------------------------------------------------------------------------

def support_floor(covariance: str, d: int) -> int:
    return {"full": 2 * (d + 1), "tied": d + 1, "diag": 10, "spherical": 10}[covariance]


def check_gmm(a: Artifact) -> None:
    covariance = a.strings.get("gmm.covariance_type")
    require(covariance in ("full", "tied", "diag", "spherical"), "gmm.covariance_type")
    k, d, big_d, n = (a.integer_key(f"gmm.{key}") for key in ("components", "dim", "feature_dim", "samples"))
    require(min(k, d, big_d) >= 1, "gmm sizes must be >= 1")
    require(k <= 1024 and big_d <= 16384 and n < 2 ** 63, "K at most 1,024, D at most 16,384, samples below 2^63")
    for key in ("fit_seconds", "extract_seconds"):
        require(key != "" and _is_number(a.strings.get(f"gmm.{key}", "")), f"gmm.{key} is not a number")
    bic, extractor, privacy = (a.json_key(f"gmm.{key}", dict) for key in ("bic", "extractor", "privacy"))
    require("gmm.tensors_sha256" in a.strings and "gmm.extractor_sha256" in a.strings, "gmm hashes missing")
    shapes = {"weights": (k,), "means": (k, d), "projection.mean": (big_d,), "projection.scale": (big_d,),
              "covariances": {"full": (k, d, d), "tied": (d, d), "diag": (k, d), "spherical": (k,)}[covariance]}
    shapes["precisions_cholesky"] = shapes["covariances"]
    if "projection.components" in a.tensors:
        shapes["projection.components"] = (d, big_d)
    else:
        require(d == big_d, "without projection.components d must equal D")
    for name, shape in shapes.items():
        require(name in a.tensors, f"tensor {name} is missing")
        dtype, stored, _ = a.tensors[name]
        require(dtype == "F64" and stored == shape, f"tensor {name} must be F64 {shape}")
    rule = "container" if a.version >= 3 else "legacy"
    require(tensor_sha256(a, shapes, rule) == a.strings["gmm.tensors_sha256"], "tensors do not match gmm.tensors_sha256")
    t = {name: a.array(name) for name in shapes}
    require(all(np.isfinite(v).all() for v in t.values()), "a tensor is not finite")
    w = t["weights"]
    require((w >= 0).all() and abs(w.sum() - 1) <= 1e-6, "weights must be >= 0 and sum to 1")
    require((t["projection.scale"] > 0).all(), "projection.scale must be > 0")
    cov = t["covariances"]
    if covariance in ("full", "tied"):
        stack = cov if covariance == "full" else cov[None]
        require(np.allclose(stack, stack.transpose(0, 2, 1)), "covariances are not symmetric")
        try:
            chol = np.linalg.cholesky(stack)
        except np.linalg.LinAlgError:
            raise Invalid("a covariance is not positive definite") from None
        precision = np.linalg.inv(chol).transpose(0, 2, 1)   # upper U with U Uᵀ = Σ⁻¹ (scikit-learn's layout)
        expected = precision if covariance == "full" else precision[0]
        variances = np.diagonal(stack, axis1=1, axis2=2) * np.ones((k, 1))
    else:
        require((cov > 0).all(), "variances must be positive")
        expected = 1 / np.sqrt(cov)
        variances = cov if covariance == "diag" else np.repeat(cov[:, None], d, axis=1)
    scale = np.abs(expected).max()
    require(np.abs(t["precisions_cholesky"] - expected).max() <= 1e-6 * scale, "precisions_cholesky disagrees")
    require(sha256_hex(compact_json(extractor).encode("ascii")) == a.strings["gmm.extractor_sha256"],
            "gmm.extractor_sha256 is not the hash of gmm.extractor")
    require(extractor.get("feature_dim") == big_d, "extractor feature_dim differs from gmm.feature_dim")
    require(all(_is_json_number(privacy.get(key)) for key in ("min_samples", "noise_scale")), "gmm.privacy numbers")
    dp = privacy.get("dp")
    if dp is None:
        require(str(k) in bic and all(_is_json_number(v) for v in bic.values()), "K is not a key of gmm.bic")
        require(bic[str(k)] <= min(bic.values()), "the chosen K does not have the lowest BIC")
    else:
        require(bic == {}, "a differentially private fit has an empty gmm.bic")
        eps, delta, rho = dp.get("epsilon"), dp.get("delta"), dp.get("rho")
        require(math.isclose(eps, rho + 2 * math.sqrt(rho * math.log(1 / delta)), rel_tol=1e-6), "dp epsilon/rho")
    require(_densities_computable(t, expected, covariance), "densities overflow (values out of range)")
    m = support_floor(covariance, d)
    require((w * n >= m - 1e-9).all(), "a component's effective support is below the floor")
    mu = t["means"]
    overall = (w[:, None] * (variances + mu ** 2)).sum(0) - ((w[:, None] * mu).sum(0)) ** 2
    ratio = np.exp(np.log(variances / overall).mean(axis=1))
    require((ratio >= 0.001).all(), "a component collapsed (variance ratio below 0.001)")


def _densities_computable(t: dict, precision: np.ndarray, covariance: str) -> bool:
    """gmm.md: the folded projection, every projected unit vector, and the log-densities of e0 and of the 16 unit
    vectors projected farthest (largest absolute entry; ties: the lower index) are finite, overflow an error."""
    scale, mean, components = t["projection.scale"], t["projection.mean"], t.get("projection.components")
    mu, w = t["means"], t["weights"]
    try:
        with np.errstate(over="raise", invalid="raise", divide="ignore"):
            linear = (components / scale).T if components is not None else np.diag(1 / scale)
            offset = -(mean @ linear)
            projected = np.eye(len(mean)) @ linear + offset         # row i: the unit vector e_i, projected
            farthest = sorted(range(len(mean)), key=lambda i: (-float(np.abs(projected[i]).max()), i))[:16]
            densities = []
            for x in projected[sorted({0, *farthest})]:
                diff = x[None, :] - mu                               # (K, d)
                if covariance == "full":
                    y = np.einsum("kd,kde->ke", diff, precision)
                    logdet = np.log(np.diagonal(precision, axis1=1, axis2=2)).sum(1)
                elif covariance == "tied":
                    y, logdet = diff @ precision, np.full(len(w), np.log(np.diag(precision)).sum())
                elif covariance == "diag":
                    y, logdet = diff * precision, np.log(precision).sum(1)
                else:
                    y, logdet = diff * precision[:, None], mu.shape[1] * np.log(precision)
                terms = np.log(w) - 0.5 * mu.shape[1] * math.log(2 * math.pi) + logdet - 0.5 * (y ** 2).sum(1)
                top = terms.max()
                densities.append(top + np.log(np.exp(terms - top).sum()))
        return bool(np.isfinite(linear).all() and np.isfinite(offset).all() and np.isfinite(projected).all()
                    and np.isfinite(densities).all())
    except FloatingPointError:
        return False


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _is_json_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# -- features.md and metric-set.md ---------------------------------------------------------------------

def _group(handle, name: str, encoding: str):
    require(name in handle, f"group {name} is missing")
    group = handle[name]
    require(_text(group.attrs.get("encoding-type", "")) == encoding, f"group {name} encoding-type")
    version = _text(group.attrs.get("encoding-version", ""))
    require(version.isdigit(), f"group {name} encoding-version")
    if int(version) > 1:
        raise Incompatible(f"group {name} encoding-version {version}")
    return group


def _dataset(group, name: str, dtype: str, shape: tuple) -> np.ndarray:
    require(name in group, f"dataset {name} is missing")
    data = group[name]
    require(data.dtype == np.dtype(dtype) and data.shape == shape, f"dataset {name} must be {dtype} {shape}")
    return data[...]


def check_features(a: Artifact) -> None:
    import h5py

    extractor, dataset = a.json_key("features.extractor", dict), a.json_key("features.dataset", dict)
    dim, rows, done = (a.integer_key(f"features.{k}") for k in ("dim", "rows", "rows_done"))
    require(done == rows, f"incomplete feature table ({done} of {rows} rows)")
    require(sha256_hex(compact_json(extractor).encode("ascii")) == a.strings.get("features.extractor_sha256"),
            "features.extractor_sha256 is not the hash of features.extractor")
    require(extractor.get("feature_dim") == dim, "extractor feature_dim differs from features.dim")
    require(dataset.get("samples") == rows and isinstance(dataset.get("reference"), str)
            and isinstance(dataset.get("fingerprint"), str), "features.dataset")
    with h5py.File(a.path, "r") as handle:
        group = _group(handle, "features", "feature-table")
        ids = _dataset(group, "ids", "int64", (rows,))
        labels = _dataset(group, "labels", "int64", (rows,))
        features = _dataset(group, "features", "float32", (rows, dim))
    require(bool((np.diff(ids) > 0).all()), "ids are not strictly increasing")
    classes = dataset.get("num_classes")
    require(bool((labels >= 0).all()) and (classes is None or bool((labels < classes).all())), "labels out of range")
    require(bool(np.isfinite(features).all()), "a feature is not finite")
    if "features.features_sha256" in a.strings:
        require(sha256_hex(features.astype("<f4").tobytes()) == a.strings["features.features_sha256"],
                "rows do not match features.features_sha256")
    if "features.index_sha256" in a.strings:   # per row: id, then label, each little-endian int64
        pairs = np.column_stack([ids, labels]).astype("<i8")
        require(sha256_hex(pairs.tobytes()) == a.strings["features.index_sha256"],
                "ids or labels do not match features.index_sha256")


def check_metric_set(a: Artifact) -> None:
    import h5py

    pool = a.json_key("metric-set.pool", dict)
    require(isinstance(pool.get("reference"), str) and isinstance(pool.get("fingerprint"), str)
            and isinstance(pool.get("samples"), int), "metric-set.pool")
    for key in ("gmm_sha256", "extractor_sha256"):
        require(f"metric-set.{key}" in a.strings, f"required attribute metric-set.{key} is missing")
    with h5py.File(a.path, "r") as handle:
        group = _group(handle, "selection", "metric-set")
        m, f = (int(_text(group.attrs[k])) for k in ("metric_size", "finetune_size"))
        require(1 <= m <= f <= pool["samples"], "metric_size / finetune_size out of range")
        strategy = _text(group.attrs.get("strategy", ""))
        require(strategy in ("topk", "stratified", "ratio", "ratio-stratified", "class-prior", "random"),
                "unknown strategy")
        ids = _dataset(group, "ids", "int64", (f,))
        ll = _dataset(group, "log_likelihood", "float64", (f,))
        component = _dataset(group, "component", "int32", (f,))
        label = _dataset(group, "label", "int64", (f,))
        if "score" in group:
            require(not np.isnan(_dataset(group, "score", "float64", (f,))).any(), "score is NaN")
    require(len(np.unique(ids)) == f and bool((ids >= 0).all()), "ids are not distinct non-negative integers")
    require(bool(np.isfinite(ll).all()), "log-likelihood not finite")
    require(bool((component >= 0).all() and (label >= 0).all()), "negative component or label")
    for part in (ll[:m], ll[m:]):
        require(bool((np.diff(part) <= 0).all()), "rows are not ordered by decreasing log-likelihood")
    require(("metric-set.class_prior" in a.strings) == (strategy == "class-prior"),
            "metric-set.class_prior goes with the class-prior strategy, and only with it")
    if strategy == "class-prior":
        shares = a.json_key("metric-set.class_prior", dict).get("shares")
        require(isinstance(shares, list) and len(shares) > 0, "metric-set.class_prior has no shares")
        shares = np.asarray(shares, dtype=float)
        require(bool(np.isfinite(shares).all() and (shares >= 0).all()) and abs(shares.sum() - 1) <= 1e-4,
                "class shares are not finite, non-negative and summing to 1")
        require(int(label.max()) < len(shares), "a label has no class share")
    if "metric-set.coverage" in a.strings:
        record = a.json_key("metric-set.coverage", dict)
        weights = np.asarray(record["weights"], dtype=float)
        for name, rows in (("metric", component[:m]), ("finetune", component)):
            shares = np.bincount(rows, minlength=len(weights))[:len(weights)] / len(rows)
            require(abs(np.minimum(shares, weights).sum() - record[name]["coverage"]) <= 1e-9,
                    f"coverage of the {name} rows disagrees with the component column")


# -- scores.md and plan.md -----------------------------------------------------------------------------

def model_record(value: Any) -> list[dict]:
    require(isinstance(value, dict) and all(k in value for k in ("architecture", "kwargs", "family", "blocks"))
            and isinstance(value.get("weights_sha256"), str), "the model record is malformed")
    return blocks_of(value["blocks"])


def check_scores(a: Artifact) -> None:
    criterion = a.strings.get("scores.criterion")
    require(criterion in ("composite", "output-norm", "magnitude", "taylor", "random"), "scores.criterion")
    blocks = model_record(a.json_key("scores.model", dict))
    a.integer_key("scores.samples")
    require("scores.probe_fraction" in a.strings, "scores.probe_fraction is missing")
    probe = strict_json(a.strings["scores.probe_fraction"])
    require(probe is None or (_is_json_number(probe) and 0 <= probe <= 1), "scores.probe_fraction")
    if criterion == "composite":
        a.json_key("scores.weights", dict)
    components = ("activity", "redundancy", "relevance") if criterion == "composite" else ()
    expected = {}
    for i, block in enumerate(blocks):
        for unit, size in (("attn", block["heads"]), ("mlp", block["mlp_hidden"])):
            for part in ("score", *components):
                expected[f"blocks.{i}.{unit}.{part}"] = (size,)
    if probe is not None:
        expected.update({f"layer_importance.{unit}": (len(blocks),) for unit in ("attn", "mlp")})
    for name, shape in expected.items():
        require(name in a.tensors and a.tensors[name][0] == "F32" and a.tensors[name][1] == shape,
                f"tensor {name} must be F32 {shape}")
        values = a.array(name)
        require(bool(np.isfinite(values).all()), f"{name} is not finite")
        require(name.endswith(".score") or bool((values >= 0).all()), f"{name} is negative")


def check_plan(a: Artifact) -> None:
    require(a.strings.get("plan.strategy") in ("kl", "kl-power", "uniform", "global"), "plan.strategy")
    budget = a.json_key("plan.budget", dict)
    require(budget.get("kind") in ("params", "macs") and _is_json_number(budget.get("value"))
            and 0 < budget["value"] <= 1, "plan.budget")
    achieved, base = a.json_key("plan.achieved", dict), a.json_key("plan.base", dict)
    record = a.json_key("plan.model", dict)
    blocks = model_record(record)
    require("plan.scores_sha256" in a.strings, "plan.scores_sha256 is missing")
    removed_heads, removed_neurons = 0, 0
    for i, block in enumerate(blocks):
        for unit, size in (("attn", block["heads"]), ("mlp", block["mlp_hidden"])):
            name = f"blocks.{i}.{unit}.keep"
            require(name in a.tensors and a.tensors[name][0] == "I64" and len(a.tensors[name][1]) == 1,
                    f"{name} must be a 1-D I64 tensor")
            keep = a.array(name)
            require(bool((np.diff(keep) > 0).all()) and (len(keep) == 0 or (keep[0] >= 0 and keep[-1] < size)),
                    f"{name} is not strictly increasing within 0..{size - 1}")
            if unit == "attn":
                removed_heads += (size - len(keep)) * block["head_dim"]
            else:
                removed_neurons += size - len(keep)
    if record["family"] == "vit" and all(len(a.array(f"blocks.{i}.{u}.keep")) for i in range(len(blocks))
                                         for u in ("attn", "mlp")):
        _check_vit_costs(record, removed_heads, removed_neurons, base, achieved)
    tolerance = a.params.get("tolerance")
    require(_is_json_number(tolerance) and 0 <= tolerance < 1, "tapvits.params.tolerance")
    for kind in ("params", "macs"):
        require(isinstance(base.get(kind), int) and base[kind] > 0 and _is_json_number(achieved.get(kind))
                and _is_json_number(achieved.get(f"{kind}_fraction")), f"plan.base / plan.achieved {kind}")
        require(abs(achieved[f"{kind}_fraction"] - achieved[kind] / base[kind]) <= 1e-12, f"{kind}_fraction")
    target = budget["value"] * base[budget["kind"]]
    require(abs(achieved[budget["kind"]] - target) <= tolerance * target * (1 + 1e-9),
            "the plan misses its budget by more than its tolerance")


def _check_vit_costs(record: dict, head_channels: int, neurons: int, base: dict, achieved: dict) -> None:
    """plan.md "Costs": what removing units saves, from the embedding width d and the tokens T."""
    kwargs = record["kwargs"]
    d = kwargs.get("embed_dim", 192)
    image, patch = kwargs.get("img_size", 224), kwargs.get("patch_size", 16)
    tokens = (image // patch) ** 2 + 1
    bias = 3 if kwargs.get("qkv_bias", True) else 0
    params = head_channels * (4 * d + bias) + neurons * (2 * d + 1)
    macs = head_channels * (tokens * 3 * d + tokens * d + 2 * tokens ** 2) + neurons * 2 * tokens * d
    require(base["params"] - achieved["params"] == params, "plan.achieved params disagree with the kept units")
    require(base["macs"] - achieved["macs"] == macs, "plan.achieved MACs disagree with the kept units")


# -- report.md and profile.md ------------------------------------------------------------------------

def _member(body: dict, name: str, kind) -> Any:
    value = body.get(name)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    require(ok, f"member {name} is missing or of another type")
    return value


def check_report(a: Artifact) -> None:
    b = a.body
    _member(b, "model", dict)
    _member(b, "dataset", str)
    samples, top1, top5 = _member(b, "samples", int), _member(b, "top1", (int, float)), _member(b, "top5", (int, float))
    _member(b, "top5_k", int)
    loss, macs, parameters = _member(b, "loss", (int, float)), _member(b, "macs", int), _member(b, "parameters", int)
    per_class, latency = _member(b, "per_class", list), _member(b, "latency", list)
    require(0 <= top1 <= top5 <= 1, "top1/top5 outside [0, 1] or top5 < top1")
    require(loss >= 0 and macs >= 0 and parameters >= 1 and samples >= 1, "negative loss/macs or parameters < 1")
    labels, total, correct = set(), 0, 0
    for entry in per_class:
        require(isinstance(entry, dict) and entry.get("label") not in labels, "per_class labels repeat")
        labels.add(entry["label"])
        n, hits = _member(entry, "samples", int), _member(entry, "correct", int)
        require(n >= 1 and 0 <= hits <= n and abs(_member(entry, "accuracy", (int, float)) - hits / n) <= 1e-9,
                "a per_class entry is inconsistent")
        total, correct = total + n, correct + hits
    require(total == samples and abs(correct / samples - top1) <= 1e-9, "per_class does not add up to the totals")
    for entry in latency:
        require(all(_member(entry, k, int) >= 1 for k in ("batch_size", "repeats", "threads"))
                and 0 < _member(entry, "median_ms", (int, float)) <= _member(entry, "p90_ms", (int, float)),
                "a latency entry is inconsistent")


def check_profile(a: Artifact) -> None:
    b = a.body
    model = _member(b, "model", dict)
    blocks = blocks_of(model.get("blocks"))
    runtime, _ = _member(b, "runtime", dict), _member(b, "hardware", dict)
    require(runtime.get("name") in ("torch", "onnxruntime") and _member(runtime, "threads", int) >= 1, "runtime")
    require(_member(b, "tokens", int) >= 1 and _member(b, "repeats", int) >= 1 and _member(b, "warmup", int) >= 0,
            "tokens/repeats/warmup")
    batches = _member(b, "batch_sizes", list)

    def increasing(values) -> bool:
        return (len(values) > 0 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)
                and all(x < y for x, y in zip(values, values[1:])))

    def latencies(values) -> bool:
        return isinstance(values, list) and len(values) == len(batches) and all(
            _is_json_number(v) and 0 < v <= 1e6 for v in values)

    require(increasing(batches), "batch_sizes")
    fixed = _member(b, "fixed", dict)
    require(all(latencies(fixed.get(k)) for k in ("embed_ms", "head_ms", "block_ms")), "fixed latencies")
    alignment = b.get("mlp_alignment", 1)   # optional: absent, one MLP curve
    require(isinstance(alignment, int) and not isinstance(alignment, bool) and alignment >= 1, "mlp_alignment")
    require((alignment > 1) == ("mlp_unaligned" in b), "mlp_unaligned exactly when mlp_alignment > 1")
    units = [("attn", max(x["heads"] for x in blocks)), ("mlp", max(x["mlp_hidden"] for x in blocks))]
    for unit, widest in units + ([("mlp_unaligned", units[1][1])] if alignment > 1 else []):
        table = _member(b, unit, dict)
        widths = table.get("widths")
        require(isinstance(widths, list) and increasing(widths) and widths[-1] <= widest, f"{unit}.widths")
        if unit != "attn":
            require(all((w % alignment == 0) == (unit == "mlp") for w in widths), f"{unit}.widths alignment")
        rows = table.get("median_ms")
        require(isinstance(rows, list) and len(rows) == len(widths) and all(latencies(r) for r in rows),
                f"{unit}.median_ms")


CHECKS = {"model": check_model, "gmm": check_gmm, "features": check_features, "metric-set": check_metric_set,
          "scores": check_scores, "plan": check_plan, "report": check_report, "profile": check_profile}


# -- datasets.md: references and fingerprints (the built-in digits source) -------------------------

def _ranges(text: str) -> list[int]:
    out = []
    for item in text.split(","):
        low, _, high = item.partition("-")
        out += range(int(low), int(high or low) + 1)
    return out


def _folds(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """datasets.md `fold`: keys from default_rng([seed, 1]); per class, by key, dealt round-robin."""
    keys = np.random.default_rng([seed, 1]).random(len(labels))
    fold = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        order = members[np.argsort(keys[members], kind="stable")]
        fold[order] = np.arange(len(order)) % n
    return fold


def digits_fingerprint(reference: str) -> str:
    """The fingerprint of a ``digits`` reference (split, classes, fold, indices, sample, seed)."""
    from sklearn.datasets import load_digits

    source, *options = reference.split(":")
    require(source == "digits", f"only the digits source is implemented here, not {source!r}")
    opts = dict(o.split("=", 1) for o in options)
    seed = int(opts.get("seed", 0))
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    labels = digits.target.astype(np.int64)
    split = opts.get("split", "train")
    if split == "all":
        rows = np.arange(len(labels))
    else:
        test = _folds(labels, 5, 0) == 0
        rows = np.flatnonzero(test if split == "test" else ~test)
    keep = np.arange(len(rows))          # positions within the split = ids
    if "classes" in opts:
        keep = keep[np.isin(labels[rows][keep], _ranges(opts["classes"]))]
    if "fold" in opts:
        k, n = map(int, opts["fold"].split("/"))
        keep = keep[_folds(labels[rows], n, seed)[keep] == k]
    if "indices" in opts:
        keep = keep[_ranges(opts["indices"])]
    if "sample" in opts:
        keep = np.sort(keep[np.random.default_rng([seed, 2]).choice(len(keep), int(opts["sample"]), replace=False)])
    head = {"format": "tapvits-dataset/1", "kind": "digits", "split": split, "samples": int(len(keep)),
            "image_shape": [1, 8, 8], "class_names": [str(c) for c in range(10)]}
    digest = hashlib.sha256(compact_json(head, ", ", ": ").encode("ascii"))   # datasets.md: spaced separators
    digest.update(keep.astype("<i8").tobytes())
    digest.update(labels[rows][keep].astype("<i8").tobytes())
    digest.update(np.ascontiguousarray(images[rows][keep], dtype="<f4").tobytes())
    return digest.hexdigest()


# -- run.md: step keys --------------------------------------------------------------------------

DATASET_OPTIONS = {"--data"}


def code_fingerprint(package: Path, libraries: dict[str, Any]) -> str:
    """run.md "code fingerprint": the sources under the installed package directory, and ``libraries``
    (distribution name → installed version or None; the caller looks them up, as this reader imports
    nothing that could find tapvits_cli)."""
    sources = {}
    for path in package.rglob("*.py"):
        if "__pycache__" not in path.parts:
            sources[path.relative_to(package).as_posix()] = sha256_hex(path.read_bytes())
    return sha256_hex(compact_json({"libraries": libraries, "sources": sources}).encode("ascii"))


def step_key(command_line: str, version: str, code: str) -> str:
    """run.md: the key of one line of ``commands.sh`` (run from the directory the run started in),
    given the tapvits version and the code fingerprint of the installation that ran it."""
    tokens = shlex.split(command_line)
    require(tokens[0] == "tapvits", "not a tapvits command")
    stage, args = tokens[1], tokens[2:]
    rendered: list[Any] = []
    for position, token in enumerate(args):
        before = args[position - 1] if position else ""
        if before in ("-o", "--output"):
            rendered.append("<output>")
        elif before in DATASET_OPTIONS:
            rendered.append({"dataset": digits_fingerprint(token)})
        elif Path(token).is_file():
            rendered.append({"artifact": sha256_hex(Path(token).read_bytes())})
        else:
            rendered.append(token)
    return sha256_hex(compact_json({"args": rendered, "code": code, "stage": stage, "tapvits": version})
                      .encode("ascii"))
