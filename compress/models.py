"""Loading the model to compress, and the family adapters that say where its blocks and Linears are.

A model is named one of three ways (recorded in the manifest, so export/eval/bench rebuild it):

* a timm registry name (``deit_small_patch16_224``, ``vit_cifar_ref``), built with
  ``timm.create_model(name, **kwargs)`` (``--img-size``, ``--num-classes``, ``--model-kwargs``);
* ``package.module:function`` or ``path/to/file.py:function``: a user entry point, called with the
  same kwargs, returning an ``nn.Module`` with its weights loaded (a timm model, a model built on
  ``torch.nn.TransformerEncoder``, or a Hugging Face ViT/DINOv2 model);

Weights (timm names): a local checkpoint (``checkpoint=``: ``.safetensors`` or a torch file read
with ``weights_only=True``; a raw state dict or one wrapped as ``{"state_dict": ...}`` /
``{"model": ...}``; loaded strictly), timm's own weights (``pretrained=True``), or, by default
(``pretrained=None``), the bundled weights of ``vit_cifar_*`` and random init for every other
model (seed torch first for repeatability). A checkpoint whose position table has another grid
than the model built is resampled at load the way its framework does it (``pos_interpolation``
"auto": timm's ``checkpoint_filter_fn``, bicubic with antialiasing, for timm models; transformers'
``interpolate_pos_encoding``, bicubic without, for Hugging Face models); the tables resampled
and the method are recorded.

Preprocessing always comes from the model actually built: its timm-style ``pretrained_cfg`` (a
user model may declare one), with the input size the architecture was built for, and explicit
overrides (``data_config``: input_size / mean / std / interpolation / crop_pct / crop_mode). A
model with neither a data config nor overrides is refused in one line. The resolved config is set
as the model's ``pretrained_cfg`` (so every loader reads it) and recorded.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from timm.data.constants import DEFAULT_CROP_MODE, DEFAULT_CROP_PCT
from torch import nn

from . import zoo
from .adapters import Adapter, find_adapter, supported
from .errors import CompressError
from .fileinfo import checkpoint_error
from .options import INTERPOLATIONS, POS_INTERPOLATIONS

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- adapters
def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of ``model``'s family (adapters.py), or a one-line CompressError naming what is supported."""
    a = find_adapter(model)
    if a is None:
        raise CompressError(f"architecture {type(model).__name__} ({type(model).__module__}) has no known "
                            f"compressible Linear layers; supported: {supported()}")
    return a


def prepare(model: nn.Module) -> nn.Module:
    """``model`` made ready for compression (its family's exact rewrite, adapters.py); load_model applies it."""
    return adapter_for(model).prepare_(model)


def _ready(model: nn.Module) -> Adapter:
    a = adapter_for(model)
    a.check_prepared(model)
    return a


def compressible_layers(model: nn.Module, include_head: bool = False) -> dict[str, nn.Linear]:
    """Qualified name -> nn.Linear for every layer the method may factorise, in network order."""
    a = _ready(model)
    out: dict[str, nn.Linear] = {}
    for stage in a.stage_names(model):
        for name in a.stage_linears(model, stage):
            out[name] = model.get_submodule(name)
    if include_head:
        for name in a.head_names(model):
            out[name] = model.get_submodule(name)
    if not out:
        raise CompressError(f"{type(model).__name__} ({a.family}) has no nn.Linear layers in its blocks; "
                            "nothing to compress")
    return out


def excluded_linears(model: nn.Module) -> set[str]:
    """Linears that multiply constants, not tokens (Swin-v2's position-bias MLP); empty for unknown models."""
    a = find_adapter(model)
    return a.excluded_linears(model) if a is not None else set()


def has_head(model: nn.Module) -> bool:
    """Whether the model ends in a classifier (False: headless, its output is the pooled features)."""
    return bool(_ready(model).head_names(model))


def num_classes(model: nn.Module) -> int:
    """Outputs of the classifier (0 for a headless model), whatever the family calls it."""
    if find_adapter(model) is None:
        return int(getattr(model, "num_classes", 0) or 0)
    heads = _ready(model).head_names(model)
    return model.get_submodule(heads[0]).out_features if heads else 0


def stages(model: nn.Module, layer_names) -> list[tuple[str, list[str]]]:
    """Split the network into sequential stages for the compensation pass (METHOD.md §4).

    Returns ``[(stage, [layer names in it]), ...]``: ``"embed"`` (no layers), then every stage of
    the family in forward order (a real submodule mapping tokens to tokens: ``blocks.<i>``, Swin's
    ``layers.<i>.downsample`` / ``layers.<i>.blocks.<j>`` ...), then ``"tail"`` (final norm,
    pooling, head). Running them in order with ``run_stage`` is the model's forward.
    """
    a = _ready(model)
    names = list(layer_names)
    out: list[tuple[str, list[str]]] = [("embed", [])]
    taken: set[str] = set()
    for stage in a.stage_names(model):
        inside = [n for n in names if n.startswith(f"{stage}.")]
        taken.update(inside)
        out.append((stage, inside))
    out.append(("tail", [n for n in names if n not in taken]))
    return out


def run_stage(model: nn.Module, stage: str, x: torch.Tensor) -> torch.Tensor:
    """Run one stage of ``stages``: embed takes images, blocks take tokens, tail gives logits
    ("features": the tail without the classifier, what the head reads)."""
    if stage == "embed":
        return _ready(model).embed(model, x)
    if stage == "tail":
        return _ready(model).tail(model, x)
    if stage == "features":   # the tail up to the head's input: pooled, normalised features
        return _ready(model).features(model, x)
    return model.get_submodule(stage)(x)


def final_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last block's output (every token, before the final norm) of preprocessed images."""
    a = _ready(model)
    h = a.embed(model, x)
    for stage in a.stage_names(model):
        h = model.get_submodule(stage)(h)
    return h


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The final features the classifier reads (pooled, normalised; the CLS token for a ViT) and the
    logits, or None for a headless model (num_classes=0)."""
    a, h = _ready(model), final_tokens(model, x)
    return a.features(model, h), (a.tail(model, h) if a.head_names(model) else None)


# ----------------------------------------------------------------------------- preprocessing
DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
CROP_MODES = ("center", "squash", "border")


def check_data_config(overrides: dict | None) -> dict:
    """Validated preprocessing overrides with normalised types, or a one-line CompressError."""
    out = {}
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k not in DATA_KEYS:
            raise CompressError(f"unknown preprocessing key {k!r}; use {', '.join(DATA_KEYS)}")
        try:
            if k == "input_size":
                v = tuple(int(x) for x in v)
                ok = len(v) == 3 and min(v) > 0
            elif k in ("mean", "std"):
                v = tuple(float(x) for x in v)
                ok = len(v) >= 1 and (k == "mean" or min(v) > 0)
            elif k == "crop_pct":
                v = float(v)
                ok = 0 < v <= 1
            else:
                ok = v in (INTERPOLATIONS if k == "interpolation" else CROP_MODES)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            expect = {"input_size": "three positive integers C H W", "mean": "one number per channel",
                      "std": "one positive number per channel", "crop_pct": "a number in (0, 1]",
                      "interpolation": "one of " + ", ".join(INTERPOLATIONS),
                      "crop_mode": "one of " + ", ".join(CROP_MODES)}[k]
            raise CompressError(f"--{k.replace('_', '-')} must be {expect}, got {overrides[k]!r}")
        out[k] = v
    return out


def resolve_preprocessing(model: nn.Module, adapter: Adapter, overrides: dict, what: str) -> dict:
    """The data config of the model as built: declared config (timm ``pretrained_cfg``), the input size
    the architecture fixes, then ``overrides``; timm's defaults only fill crop and interpolation."""
    declared = getattr(model, "pretrained_cfg", None) or {}
    cfg = {k: declared[k] for k in DATA_KEYS if isinstance(declared, dict) and declared.get(k) is not None}
    built = adapter.input_size(model)
    if built is not None:
        given = overrides.get("input_size")
        if given is not None and tuple(given) != built:
            raise CompressError(f"--input-size {' '.join(map(str, given))} does not match {what}, built for "
                                f"{' '.join(map(str, built))} (change the model with --img-size)")
        cfg["input_size"] = built
    cfg.update(overrides)
    missing = [k for k in ("input_size", "mean", "std") if k not in cfg]
    if missing:
        flags = {"input_size": "--input-size C H W", "mean": "--mean R G B", "std": "--std R G B"}
        raise CompressError(f"{what} has no data config ({', '.join(missing)} unknown): pass "
                            f"{' '.join(flags[k] for k in missing)}, or give the model a timm-style "
                            "pretrained_cfg dict")
    cfg.setdefault("interpolation", "bicubic")
    cfg.setdefault("crop_pct", DEFAULT_CROP_PCT)
    cfg.setdefault("crop_mode", DEFAULT_CROP_MODE)
    cfg["input_size"] = tuple(int(v) for v in cfg["input_size"])
    for k in ("mean", "std"):
        cfg[k] = tuple(float(v) for v in cfg[k])
        if len(cfg[k]) != cfg["input_size"][0]:
            raise CompressError(f"{what}: --{k} has {len(cfg[k])} values for {cfg['input_size'][0]} input channels")
    return {k: cfg[k] for k in DATA_KEYS}


def apply_preprocessing(model: nn.Module, cfg: dict) -> None:
    """Make ``cfg`` the model's timm ``pretrained_cfg`` (other keys, e.g. label names, are kept), so
    every loader resolving the model's data config (calibration_data.make_loader) reads it."""
    declared = getattr(model, "pretrained_cfg", None)
    merged = {**(declared if isinstance(declared, dict) else {}), **cfg}
    merged["input_size"] = tuple(merged["input_size"])
    model.pretrained_cfg = merged
    if hasattr(model, "default_cfg"):
        model.default_cfg = merged


# ----------------------------------------------------------------------------- loading
@dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild the model exactly, and where its weights came from."""
    name: str                # timm name, or "module:function" / "/abs/file.py:function"
    checkpoint: str | None
    pretrained: bool
    kwargs: dict             # passed to timm.create_model or the entry point
    weights: str             # "checkpoint", "bundled", "zoo", "timm-hub", "random-init" or "entry-point"
    family: str = ""         # adapter family (adapters.py)
    outputs: str = "logits"  # "features" for a headless model
    entry: dict | None = None
    data_config: dict = field(default_factory=dict)     # the preprocessing overrides given
    preprocessing: dict = field(default_factory=dict)   # the resolved data config
    pos_interpolation: str = "auto"
    pos_resampled: dict | None = None                   # {"method", "tables": {key: [old, new]}}

    def to_dict(self) -> dict:
        def plain(d):
            return json.loads(json.dumps(d)) if d is not None else None

        return {"name": self.name, "checkpoint": self.checkpoint, "pretrained": self.pretrained,
                "kwargs": dict(self.kwargs), "weights": self.weights, "family": self.family,
                "outputs": self.outputs, "entry": plain(self.entry), "data_config": plain(self.data_config),
                "preprocessing": plain(self.preprocessing), "pos_interpolation": self.pos_interpolation,
                "pos_resampled": plain(self.pos_resampled)}


def check_model_name(name: str) -> None:
    """One-line error with close matches for a name timm does not know."""
    if timm.is_model(name):
        return
    names = timm.list_models()
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    if not close:  # prefix matches help with typos in the size suffix
        stem = name.split("_")[0]
        close = [n for n in names if n.startswith(stem)][:5]
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise CompressError(f"unknown model {name!r}{hint} (a user model is package.module:function or "
                        "path/to/file.py:function)")


def is_entry_point(name: str) -> bool:
    """``package.module:function`` or ``path/file.py:function`` (timm's hub prefixes are names)."""
    return ":" in name and not name.startswith(("hf-hub:", "hf_hub:", "local-dir:"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def resolve_entry_point(name: str):
    """(callable, description) of an entry point; a one-line CompressError when it cannot be imported."""
    target, _, fn_name = name.rpartition(":")
    if not target or not fn_name.isidentifier():
        raise CompressError(f"--model {name!r}: expected package.module:function or path/to/file.py:function")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise CompressError(f"--model {name}: {path} is not a file")
        modname = "_vit_edge_entry_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        module = sys.modules.get(modname)
        if module is None:
            spec = importlib.util.spec_from_file_location(modname, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[modname] = module
            try:
                spec.loader.exec_module(module)
            except Exception as e:  # noqa: BLE001 - user code can raise anything
                del sys.modules[modname]
                raise CompressError(f"--model {name}: importing {path} failed: {_first_line(e)}") from None
        desc = {"kind": "file", "path": str(path), "function": fn_name, "sha256": _sha256(path)}
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            raise CompressError(f"--model {name}: no module named {e.name or target!r} (is it on PYTHONPATH?)") from None
        except Exception as e:  # noqa: BLE001
            raise CompressError(f"--model {name}: importing {target} failed: {_first_line(e)}") from None
        desc = {"kind": "module", "module": target, "function": fn_name}
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise CompressError(f"--model {name}: {target} has no function {fn_name!r}")
    return fn, desc


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _call_entry(fn, name: str, kwargs: dict) -> nn.Module:
    try:
        model = fn(**kwargs)
    except Exception as e:  # noqa: BLE001 - the user's function
        raise CompressError(f"--model {name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) raised "
                            f"{_first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise CompressError(f"--model {name} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def build_raw(name: str, kwargs: dict, pretrained: bool = False) -> tuple[nn.Module, dict | None]:
    """The model as its builder returns it (before ``prepare``), and the entry point's description."""
    if is_entry_point(name):
        fn, desc = resolve_entry_point(name)
        return _call_entry(fn, name, kwargs), desc

    check_model_name(name)
    return _create(timm, name, pretrained, kwargs), None


def load_model(name: str, checkpoint: str | Path | None = None, pretrained: bool | None = None,
               **kwargs) -> nn.Module:
    """The model, prepared for compression, in eval mode, float32, on the CPU; see the module docstring.
    Keywords ``data_config`` and ``pos_interpolation`` are load options, the rest go to the builder."""
    model, _ = load_model_with_spec(name, checkpoint, pretrained, **kwargs)
    return model


def load_model_with_spec(name: str, checkpoint: str | Path | None = None, pretrained: bool | None = None,
                         *, data_config: dict | None = None, pos_interpolation: str = "auto",
                         **kwargs) -> tuple[nn.Module, ModelSpec]:
    overrides = check_data_config(data_config)
    if pos_interpolation not in POS_INTERPOLATIONS:
        raise CompressError(f"--pos-interpolation must be one of {', '.join(POS_INTERPOLATIONS)}, "
                            f"got {pos_interpolation!r}")
    if checkpoint is not None and pretrained:
        raise CompressError("pass either --checkpoint or --pretrained, not both")
    entry = None
    if is_entry_point(name):
        if pretrained:
            raise CompressError("--pretrained is for timm names; an entry point loads its own weights")
        fn, entry = resolve_entry_point(name)
        if entry["kind"] == "file":
            name = f"{entry['path']}:{entry['function']}"   # absolute, so later stages run from anywhere
        model, pretrained, source = _call_entry(fn, name, kwargs), False, "entry-point"
    else:
        check_model_name(name)
        bundled = name in zoo.reference.ARCHS
        if checkpoint is None and pretrained is None:
            pretrained = (bundled and zoo.reference.weights_path(name).is_file()) or (
                name in zoo.MODELS and zoo.MODELS[name]())
            if bundled and not pretrained:
                log.warning("no bundled weights for %s at %s: using random init "
                            "(train them with `make reference-model` or pass --checkpoint)",
                            name, zoo.reference.weights_path(name))
            elif name in zoo.MODELS and not pretrained:
                log.warning("%s is not prepared on this machine: using random init (run `make real-model`)", name)
        pretrained = bool(pretrained)
        model = _create(timm, name, pretrained, kwargs)
        source = ("bundled" if bundled else "zoo" if name in zoo.MODELS else "timm-hub") if pretrained else "random-init"
    adapter = adapter_for(model)
    resampled, path = None, None
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        interp = adapter.default_pos_interpolation() if pos_interpolation == "auto" else pos_interpolation
        resampled = _load_checkpoint(model, path, adapter, interp)
        source = "checkpoint"
    model = adapter.prepare_(model).float().eval()
    preprocessing = resolve_preprocessing(model, adapter, overrides, name)
    apply_preprocessing(model, preprocessing)
    spec = ModelSpec(name, str(path.resolve()) if path else None, pretrained, dict(kwargs), source,
                     family=adapter.family, outputs="logits" if adapter.head_names(model) else "features",
                     entry=entry, data_config=overrides, preprocessing=preprocessing,
                     pos_interpolation=pos_interpolation, pos_resampled=resampled)
    check_finite(model, spec.checkpoint or name)
    return model, spec


def load_from_spec(spec: dict, seed: int | None = None) -> nn.Module:
    """The dense model a manifest's ``model`` section describes, rebuilt exactly (a random-init or
    entry-point model with the seed compress used: it seeds torch right before building)."""
    entry = spec.get("entry") or {}
    if entry.get("kind") == "file" and entry.get("sha256"):
        p = Path(entry["path"])
        if p.is_file() and _sha256(p) != entry["sha256"]:
            log.warning("%s changed since the model was compressed (sha256 %s, recorded %s)", p, _sha256(p),
                        entry["sha256"])
    with torch.random.fork_rng(devices=[]):
        if spec.get("weights") in ("random-init", "entry-point") and seed is not None:
            torch.manual_seed(seed)
        return load_model(spec["name"], checkpoint=spec.get("checkpoint"), pretrained=spec.get("pretrained"),
                          data_config=spec.get("data_config") or {},
                          pos_interpolation=spec.get("pos_interpolation") or "auto", **(spec.get("kwargs") or {}))


def _create(timm, name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except FileNotFoundError as e:
        if name in zoo.reference.ARCHS or name in zoo.MODELS:  # local weights missing: say how to make them
            raise CompressError(str(e)) from None
        raise CompressError(_hub_message(name, e)) from None
    except (TypeError, ValueError, AssertionError) as e:  # bad keyword or value for this architecture
        if pretrained and not isinstance(e, TypeError):
            raise CompressError(_hub_message(name, e)) from None
        raise CompressError(f"cannot build {name} with {kwargs}: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - hub/network failures come in many types
        if not pretrained:
            raise
        raise CompressError(_hub_message(name, e)) from None


def _hub_message(name: str, e: Exception) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return (f"could not fetch pretrained weights for {name} (model hub unreachable?): {first[:160]}; "
            f"download them elsewhere and pass --checkpoint FILE")


def _read_state_dict(path: Path) -> dict:
    if not path.is_file():
        raise CompressError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt files raise many different types

        raise CompressError(checkpoint_error(path, e)) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        what = type(state).__name__ if not isinstance(state, dict) else (
            "an empty dict" if not state else "a dict of " + ", ".join(sorted({type(v).__name__ for v in state.values()})))
        raise CompressError(f"checkpoint {path} holds {what}; expected a state dict of tensors "
                            "(torch.save(model.state_dict()))")
    if all(k.startswith("module.") for k in state):  # saved from DataParallel/DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _load_checkpoint(model: nn.Module, path: Path, adapter: Adapter, interpolation: str) -> dict | None:
    """Load ``path`` strictly into ``model``; a state that does not fit as it is goes through the
    family's checkpoint filter first (position tables resampled). Returns what was resampled."""
    state = _read_state_dict(path)
    own = model.state_dict()
    resampled = None
    fits = set(state) == set(own) and all(tuple(state[k].shape) == tuple(v.shape) for k, v in own.items())
    if not fits and interpolation != "none":
        before = {k: tuple(v.shape) for k, v in state.items()}
        try:
            state = adapter.filter_checkpoint(model, state, interpolation)
        except CompressError:
            raise
        except Exception as e:  # noqa: BLE001 - a foreign file the framework's filter cannot read
            raise CompressError(f"checkpoint {path} does not match {type(model).__name__} and its "
                                f"{adapter.framework} checkpoint filter failed: {_first_line(e)}") from None
        tables = {k: [list(before[k]), list(v.shape)] for k, v in state.items()
                  if k in before and tuple(v.shape) != before[k]}
        if tables:
            how = {"timm": "timm checkpoint_filter_fn", "transformers": "transformers interpolate_pos_encoding"}
            resampled = {"method": interpolation, "by": how.get(adapter.framework, adapter.framework),
                         "tables": tables}
            log.info("%s: resampled %s (%s)", path, ", ".join(f"{k} {o} -> {n}" for k, (o, n) in tables.items()),
                     interpolation)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise CompressError(f"checkpoint {path} does not match {type(model).__name__}: "
                            f"{'; '.join(parts)} keys")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CompressError(f"checkpoint {path} does not match the model: {k} has shape "
                                f"{tuple(state[k].shape)}, the model expects {tuple(v.shape)}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    return resampled


def check_finite(model: nn.Module, what: str) -> None:
    for k, v in model.state_dict().items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CompressError(f"{what}: weight {k} contains NaN or Inf values")


def count_params(model: nn.Module) -> int:
    """Every parameter of the model (embeddings, norms, head included), METHOD.md §1."""
    return sum(p.numel() for p in model.parameters())


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of the state dict (names, shapes, bytes): the model's identity for stats caching."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(str(v.dtype).encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
