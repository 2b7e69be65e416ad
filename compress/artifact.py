"""The compressed-model directory: the one artifact compress hands to export and runtime.

    out_dir/manifest.json       model spec, method, budget, rank map, per-layer shapes/ranks/
                                errors, params, calibration set, INT8 ranges, versions, config
    out_dir/weights.safetensors the full state dict of the compressed model (float32)
    out_dir/report.md           human summary;  out_dir/ranks.png  rank per layer

``load_compressed`` needs nothing else: it builds ``timm.create_model(name, pretrained=False,
**kwargs)`` (or calls the recorded entry point), applies the family's rewrite (compress.models.prepare), puts a LowRankLinear of the recorded shape at every factorised layer and loads
the weights strictly, so outputs are bit-identical to the model that was saved.
Writes are atomic: everything goes to a temporary sibling directory that replaces
``out_dir`` in one swap (cliutil.staging_dir), so an interrupted run never leaves a half-written
artifact. Reading validates the manifest against SCHEMA (one error naming the key).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path

import torch
from torch import nn

from safetensors import SafetensorError
from safetensors.torch import load_file, save

from calibration_data import is_spec
from cliutil import staging_dir

from . import report, zoo  # noqa: F401  (zoo: registers the bundled models)
from .errors import CompressError
from .lowrank import LowRankLinear, lowrank_layers, replace_module_
from .models import adapter_for, apply_preprocessing, build_raw, load_from_spec, resolve_preprocessing

log = logging.getLogger(__name__)

FORMAT = "vit-edge.compressed"
FORMAT_VERSION = 1
FILES = ("manifest.json", "weights.safetensors", "report.md", "ranks.png")


def _state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    seen: set[int] = set()
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        if v.data_ptr() in seen and v.numel():  # safetensors refuses shared storage
            v = v.clone()
        seen.add(v.data_ptr())
        out[k] = v
    return out


def check_manifest_matches(model: nn.Module, manifest: dict) -> None:
    """The manifest's layer table must describe exactly the model's LowRankLinears."""
    lr = lowrank_layers(model)
    listed = {n for n, l in manifest.get("layers", {}).items() if not l.get("dense")}
    if set(lr) != listed:
        raise ValueError(f"manifest lists low-rank layers {sorted(listed - set(lr))[:3]} the model lacks "
                         f"or misses {sorted(set(lr) - listed)[:3]}")
    for n, mod in lr.items():
        l = manifest["layers"][n]
        if (l["in"], l["out"], l["rank"], l["comp_rank"]) != (mod.in_features, mod.out_features, mod.rank,
                                                               mod.comp_rank):
            raise ValueError(f"manifest entry of {n} does not match its module")


def replace_refusal(out: Path) -> str | None:
    """Why ``out`` may not be replaced by a compressed model (None: empty, or one already)."""
    if out.is_dir() and (not any(out.iterdir()) or (out / "manifest.json").is_file()):
        return None
    return "exists and is not a compressed-model directory; choose a new path (it would be replaced)"


def safetensors_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors.torch.save with a canonical header: the library writes ``__metadata__`` from a
    hash map whose order changes from call to call, so equal inputs would give different bytes."""
    raw = save(state, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps({"__metadata__": header.pop("__metadata__"), **header}, separators=(",", ":"), ensure_ascii=False)
    text = text.encode() + b" " * (-len(text.encode()) % 8)   # the data that follows stays 8-aligned
    return len(text).to_bytes(8, "little") + text + raw[8 + n:]


def save_compressed(out_dir: str | Path, model: nn.Module, manifest: dict) -> Path:
    """Write the four files atomically (replacing an earlier artifact at ``out_dir``).

    Equal models and manifests give byte-identical weights.safetensors; the torch thread count
    is recorded (``torch_threads``) because float reductions, hence the weights, depend on it.
    """
    check_manifest_matches(model, manifest)
    manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION,
                    torch_threads=manifest.get("torch_threads", torch.get_num_threads()))
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and replace_refusal(out):
        raise CompressError(f"--out {out} {replace_refusal(out)}")
    with staging_dir(out) as tmp:
        text = json.dumps(manifest, indent=1, allow_nan=False, default=_json_default)
        (tmp / "manifest.json").write_text(text + "\n")
        (tmp / "weights.safetensors").write_bytes(safetensors_bytes(
            _state_for_saving(model), {"format": FORMAT, "format_version": str(FORMAT_VERSION)}))
        (tmp / "report.md").write_text(report.render_report(manifest))
        report.plot_ranks(manifest, tmp / "ranks.png")
        for f in FILES:
            os.chmod(tmp / f, 0o644)
    log.info("wrote %s", out)
    return out


def fingerprint(path: str | Path) -> str:
    """Identity of a compressed model: sha256 of its weights.safetensors (16 hex digits).
    Export records it in every ONNX file; evaluation checks it against --compressed."""
    wp = Path(path).expanduser() / "weights.safetensors"
    h = hashlib.sha256()
    try:
        with open(wp, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except FileNotFoundError:
        raise CompressError(f"{Path(path)} has no weights.safetensors") from None
    return h.hexdigest()[:16]


def _json_default(o):
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


# ----------------------------------------------------------------------------- manifest schema
# What readers of a manifest rely on; anything else is free-form. A spec is a type, a tuple of
# alternatives (None allowed), a dict {key: spec} (keys ending in "?" optional), or {"*": spec}
# for a mapping of any names to spec. Numbers are int/float but never bool.
_NUM, _INT, _POS, _NONNEG = "number", "int", "positive", "nonnegative"
_RANGE = {"input": _NONNEG, "mid?": (None, _NONNEG)}
_RANGES = (None, {"*": _RANGE})
SCHEMA = {
    "format": str,
    "format_version?": _INT,
    "model": {"name": str, "checkpoint?": (None, str), "pretrained?": (None, bool), "kwargs?": dict,
              "weights?": (None, str)},
    "layers": {"*": {"in": _POS, "out": _POS, "rank": _INT, "comp_rank?": _INT, "dense?": bool, "bias?": bool}},
    "params?": {"before": _INT, "after": _INT, "removed_ratio?": _NUM},
    "quant?": (None, {"enabled?": bool, "act_ranges?": _RANGES, "dense_act_ranges?": _RANGES}),
    "calibration?": (None, {"path?": (None, str), "images?": (None, _INT)}),
    "config?": (None, {"seed?": (None, _INT)}),
}


def _type_name(spec) -> str:
    if isinstance(spec, tuple):
        return " or ".join(_type_name(s) for s in spec)
    if spec is None:
        return "null"
    if isinstance(spec, dict):
        return "an object"
    return {str: "a string", bool: "true/false", dict: "an object", _NUM: "a number", _INT: "an integer >= 0",
            _POS: "a number > 0", _NONNEG: "a number >= 0"}[spec]


def _matches(value, spec) -> bool:
    if spec is None:
        return value is None
    if isinstance(spec, dict):
        return isinstance(value, dict)
    if spec in (_NUM, _INT, _POS, _NONNEG):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        return spec == _NUM or (spec == _INT and isinstance(value, int) and value >= 0) or \
            (spec == _POS and value > 0) or (spec == _NONNEG and value >= 0)
    return isinstance(value, spec)


def _validate(value, spec, where: str) -> None:
    alternatives = spec if isinstance(spec, tuple) else (spec,)
    for alt in alternatives:
        if _matches(value, alt):
            if isinstance(alt, dict):
                if set(alt) == {"*"}:
                    for k, v in value.items():
                        _validate(v, alt["*"], f"{where}.{k}")
                else:
                    for key, sub in alt.items():
                        name = key.rstrip("?")
                        if name in value:
                            _validate(value[name], sub, f"{where}.{name}")
                        elif not key.endswith("?"):
                            raise ValueError(f"{where}.{name} is missing")
            return
    got = "null" if value is None else f"{type(value).__name__} {json.dumps(value)[:40]}"
    raise ValueError(f"{where} must be {_type_name(spec)}, got {got}")


def validate_manifest(manifest, source: str | Path = "manifest.json") -> None:
    """Check a loaded manifest against SCHEMA and its own cross references; CompressError (one
    line naming the key) on the first problem."""
    try:
        if not isinstance(manifest, dict):
            raise ValueError(f"the top level must be an object, got {type(manifest).__name__}")
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format is {manifest.get('format')!r}, expected {FORMAT!r}")
        _validate(manifest, SCHEMA, "manifest")
        for name, layer in manifest["layers"].items():
            if not layer.get("dense") and not 0 < layer["rank"] <= min(layer["in"], layer["out"]):
                raise ValueError(f"manifest.layers.{name}.rank {layer['rank']} is outside [1, min(in, out)]")
        for name, r in ((manifest.get("quant") or {}).get("act_ranges") or {}).items():
            layer = manifest["layers"].get(name)
            if layer is not None and not layer.get("dense") and r.get("mid") is None:
                raise ValueError(f"manifest.quant.act_ranges.{name}.mid is missing for a low-rank layer")
    except ValueError as e:
        raise CompressError(f"{source} is not a valid {FORMAT} manifest: {e}") from None


def read_manifest(path: str | Path) -> dict:
    """The validated manifest of a compressed-model directory; a relative model checkpoint
    path in it is resolved against that directory (not the working directory)."""
    d = Path(path).expanduser()
    if not d.is_dir():
        raise CompressError(f"compressed model directory {d} does not exist; run `python -m compress` first")
    mp = d / "manifest.json"
    if not mp.is_file():
        raise CompressError(f"{d} has no manifest.json; it is not a compressed-model directory")
    try:
        manifest = json.loads(mp.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CompressError(f"{mp} is corrupt: {e}") from None
    except OSError as e:
        raise CompressError(f"cannot read {mp}: {e.strerror or e}") from None
    validate_manifest(manifest, mp)
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise CompressError(f"{mp} has format version {manifest['format_version']}; this code reads "
                            f"<= {FORMAT_VERSION}")

    for section, key in (("model", "checkpoint"), ("calibration", "path")):
        p = (manifest.get(section) or {}).get(key)
        if p and not is_spec(p) and not Path(p).expanduser().is_absolute():   # 'cifar10:train' is no path
            manifest[section][key] = str((d / Path(p).expanduser()).absolute())
    return manifest


def build_architecture(manifest: dict) -> nn.Module:
    """The compressed architecture with uninitialised-weights semantics (weights to be loaded): the
    recorded builder (timm name or entry point) and kwargs, the family's rewrite, the recorded
    preprocessing, and a LowRankLinear of the recorded shape at every factorised layer."""
    spec = manifest["model"]
    try:
        with torch.random.fork_rng(devices=[]):  # the throwaway init must not disturb the caller's RNG
            model, _ = build_raw(spec["name"], spec.get("kwargs") or {})
    except CompressError as e:
        raise CompressError(f"cannot build {spec.get('name')!r} from the manifest: {e}") from None
    except Exception as e:  # noqa: BLE001 - unknown name / kwargs in a foreign manifest
        raise CompressError(f"cannot build {spec.get('name')!r} from the manifest: {e}") from None
    adapter = adapter_for(model)
    model = adapter.prepare_(model).float()
    apply_preprocessing(model, spec.get("preprocessing") or
                        resolve_preprocessing(model, adapter, spec.get("data_config") or {}, spec["name"]))
    for name, l in manifest["layers"].items():
        if l.get("dense"):
            continue
        try:
            replace_module_(model, name, LowRankLinear(l["in"], l["out"], l["rank"], l["comp_rank"],
                                                       bias=l.get("bias", True)))
        except (KeyError, AttributeError, ValueError) as e:
            raise CompressError(f"manifest layer {name} does not fit {spec['name']}: {e}") from None
    return model


def load_compressed(path: str | Path, device: str = "cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode, manifest) rebuilt from the directory alone."""
    d = Path(path).expanduser()
    manifest = read_manifest(d)
    wp = d / "weights.safetensors"
    if not wp.is_file():
        raise CompressError(f"{d} has no weights.safetensors")
    try:
        state = load_file(str(wp))
    except (SafetensorError, OSError, ValueError) as e:
        raise CompressError(f"{wp} is corrupt: {e}") from None
    model = build_architecture(manifest)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CompressError(f"{wp} does not match the manifest's architecture: "
                            f"{' '.join(first[:2])[:200]}") from None
    return model.eval().to(device), manifest


def load_dense(manifest: dict) -> nn.Module:
    """The dense original of a compressed model (eval mode), rebuilt from its manifest alone.

    A random-init model is rebuilt with the seed compress used (it seeds torch right before
    building the model), so "dense" is the network that was compressed.
    """
    return load_from_spec(manifest["model"], (manifest.get("config") or {}).get("seed"))
