"""The compressed-model directory: the one artifact compress hands to export and runtime.

    out_dir/manifest.json       model spec, method, budget, rank map, per-layer shapes/ranks/
                                errors, params, calibration set, INT8 ranges, versions, config
    out_dir/weights.safetensors the full state dict of the compressed model (float32)
    out_dir/report.md           human summary;  out_dir/ranks.png  rank per layer

``load_compressed`` needs nothing else: it builds ``timm.create_model(name, pretrained=False,
**kwargs)``, puts a LowRankLinear of the recorded shape at every factorised layer and loads
the weights strictly, so outputs are bit-identical to the model that was saved.
Writes are atomic: everything goes to a temporary sibling directory that replaces
``out_dir`` in one rename, so an interrupted run never leaves a half-written artifact.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from torch import nn

from .errors import CompressError
from .lowrank import LowRankLinear, lowrank_layers, replace_module_

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


def save_compressed(out_dir: str | Path, model: nn.Module, manifest: dict) -> Path:
    """Write the four files atomically (replacing an earlier artifact at ``out_dir``)."""
    from safetensors.torch import save_file

    from .report import plot_ranks, render_report

    check_manifest_matches(model, manifest)
    manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION)
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "manifest.json").is_file())):
        raise CompressError(f"--out {out} exists and is not a compressed-model directory; "
                            "choose a new path (it would be replaced)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        text = json.dumps(manifest, indent=1, allow_nan=False, default=_json_default)
        (tmp / "manifest.json").write_text(text + "\n")
        save_file(_state_for_saving(model), str(tmp / "weights.safetensors"),
                  metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        (tmp / "report.md").write_text(render_report(manifest))
        plot_ranks(manifest, tmp / "ranks.png")
        for f in FILES:
            os.chmod(tmp / f, 0o644)
        os.chmod(tmp, 0o755)
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s", out)
    return out


def _json_default(o):
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def read_manifest(path: str | Path) -> dict:
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
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("layers"), dict) \
            or not isinstance(manifest.get("model"), dict):
        raise CompressError(f"{mp} is not a {FORMAT} manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise CompressError(f"{mp} has format version {manifest['format_version']}; this code reads "
                            f"<= {FORMAT_VERSION}")
    return manifest


def build_architecture(manifest: dict) -> nn.Module:
    """The compressed architecture with uninitialised-weights semantics (weights to be loaded)."""
    import timm

    from . import reference_model  # noqa: F401  (registers the bundled models)

    spec = manifest["model"]
    try:
        with torch.random.fork_rng(devices=[]):  # the throwaway init must not disturb the caller's RNG
            model = timm.create_model(spec["name"], pretrained=False, **spec.get("kwargs", {}))
    except Exception as e:  # noqa: BLE001 - unknown name / kwargs in a foreign manifest
        raise CompressError(f"cannot build {spec.get('name')!r} from the manifest: {e}") from None
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
    from safetensors import SafetensorError
    from safetensors.torch import load_file

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
