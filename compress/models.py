"""Loading the model to compress, and the adapter table that says which Linears to compress.

Weights come from one of three places (decided here, recorded in the manifest):

* a local checkpoint (``checkpoint=``): ``.safetensors`` or a torch file read with
  ``weights_only=True``; a raw state dict or one wrapped as ``{"state_dict": ...}`` /
  ``{"model": ...}``; loaded strictly into ``timm.create_model(name, pretrained=False)``;
* ``pretrained=True``: timm's own weights (the hub; bundled file for ``vit_cifar_*``);
* ``pretrained=None`` (the default, "auto"): the bundled reference models load their
  bundled weights when the file exists (a random CIFAR model is useless) and otherwise
  fall back to random init with a warning; every other timm model is randomly
  initialised, because model hubs are often unreachable on build and edge machines.
  ``pretrained=False`` always means random init (seed torch first for repeatability).
"""
from __future__ import annotations

import difflib
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import reference_model
from .errors import CompressError

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- adapters
@dataclass(frozen=True)
class Adapter:
    """Where the compressible Linear layers of one model family live.

    ``classes``: class names (matched anywhere in the model's MRO); ``blocks``: the
    attribute holding the sequence of transformer blocks; ``linears``: patterns, relative
    to one block, of the Linears to factorise, in forward order; ``head``: classifier
    Linear(s) that may be added with ``include_head``.
    """
    family: str
    classes: tuple[str, ...]
    blocks: str
    linears: tuple[str, ...]
    head: tuple[str, ...]


# One row per model family; supporting a new family is one more row (plus, if its forward
# is not embed -> blocks -> head, a small change to ``stages``).
ADAPTERS: tuple[Adapter, ...] = (
    Adapter("vit", ("VisionTransformer",), "blocks",
            ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"), ("head", "head_dist")),
)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of ``model``'s family, or a one-line CompressError naming what is supported."""
    mro = {c.__name__ for c in type(model).__mro__}
    for a in ADAPTERS:
        if mro & set(a.classes):
            return a
    supported = ", ".join(f"{a.family} ({'/'.join(a.classes)})" for a in ADAPTERS)
    raise CompressError(
        f"architecture {type(model).__name__} has no known compressible Linear layers "
        f"(attention qkv/proj, MLP fc1/fc2); supported families: {supported}")


def compressible_layers(model: nn.Module, include_head: bool = False) -> dict[str, nn.Linear]:
    """Qualified name -> nn.Linear for every layer the method may factorise, in network order."""
    a = adapter_for(model)
    blocks = getattr(model, a.blocks, None)
    if blocks is None:
        raise CompressError(f"{type(model).__name__} has no '{a.blocks}' attribute")
    out: dict[str, nn.Linear] = {}
    for i in range(len(blocks)):
        for rel in a.linears:
            name = f"{a.blocks}.{i}.{rel}"
            mod = _get(model, name)
            if isinstance(mod, nn.Linear):
                out[name] = mod
    if include_head:
        for name in a.head:
            mod = _get(model, name)
            if isinstance(mod, nn.Linear):
                out[name] = mod
    if not out:
        raise CompressError(
            f"{type(model).__name__} has no nn.Linear layers matching "
            f"{', '.join(a.linears)} inside '{a.blocks}'; nothing to compress")
    return out


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def stages(model: nn.Module, layer_names) -> list[tuple[str, list[str]]]:
    """Split the network into sequential stages for the compensation pass (METHOD.md §4).

    Returns ``[(stage, [layer names in it]), ...]`` where stage is ``"embed"`` (no layers),
    ``"<blocks>.<i>"`` or ``"tail"`` (final norm + pooling + head). Use ``run_stage`` to
    execute one.
    """
    a = adapter_for(model)
    names = list(layer_names)
    out: list[tuple[str, list[str]]] = [("embed", [])]
    for i in range(len(getattr(model, a.blocks))):
        prefix = f"{a.blocks}.{i}."
        out.append((f"{a.blocks}.{i}", [n for n in names if n.startswith(prefix)]))
    tail = [n for n in names if not n.startswith(f"{a.blocks}.")]
    out.append(("tail", tail))
    return out


def run_stage(model: nn.Module, stage: str, x: torch.Tensor) -> torch.Tensor:
    """Run one stage of ``stages``: embed takes images, blocks take tokens, tail gives logits
    ("features": the tail without the classifier, what the head reads)."""
    if stage == "embed":
        x = model.patch_embed(x)
        x = model._pos_embed(x)
        x = model.patch_drop(x)
        return model.norm_pre(x)
    if stage == "tail":
        return model.forward_head(model.norm(x))
    if stage == "features":   # the tail up to the head's input: pooled, normalised features
        return model.forward_head(model.norm(x), pre_logits=True)
    return model.get_submodule(stage)(x)


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The final features the classifier reads (pooled, normalised; the CLS token for a ViT) and the
    logits, or None for a headless model (num_classes=0)."""
    tokens = model.forward_features(x)
    feats = model.forward_head(tokens, pre_logits=True)
    return feats, (model.forward_head(tokens) if getattr(model, "num_classes", 0) else None)


# ----------------------------------------------------------------------------- loading
@dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild the architecture, and where the weights came from."""
    name: str
    checkpoint: str | None
    pretrained: bool
    kwargs: dict
    weights: str  # "checkpoint", "bundled", "timm-hub" or "random-init"

    def to_dict(self) -> dict:
        return {"name": self.name, "checkpoint": self.checkpoint, "pretrained": self.pretrained,
                "kwargs": dict(self.kwargs), "weights": self.weights}


def check_model_name(name: str) -> None:
    """One-line error with close matches for a name timm does not know."""
    import timm

    if timm.is_model(name):
        return
    names = timm.list_models()
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    if not close:  # prefix matches help with typos in the size suffix
        stem = name.split("_")[0]
        close = [n for n in names if n.startswith(stem)][:5]
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise CompressError(f"unknown model {name!r}{hint}")


def load_model(name: str, checkpoint: str | Path | None = None, pretrained: bool | None = None,
               **kwargs) -> nn.Module:
    """A timm model in eval mode, float32, on the CPU; see the module docstring for weights."""
    model, _ = load_model_with_spec(name, checkpoint, pretrained, **kwargs)
    return model


def load_model_with_spec(name: str, checkpoint: str | Path | None = None,
                         pretrained: bool | None = None, **kwargs) -> tuple[nn.Module, ModelSpec]:
    import timm

    check_model_name(name)
    bundled = name in reference_model.ARCHS
    if checkpoint is not None:
        if pretrained:
            raise CompressError("pass either --checkpoint or --pretrained, not both")
        path = Path(checkpoint).expanduser()
        model = _create(timm, name, False, kwargs)
        _load_checkpoint(model, path)
        spec = ModelSpec(name, str(path.resolve()), False, kwargs, "checkpoint")
    else:
        if pretrained is None:
            pretrained = bundled and reference_model.weights_path(name).is_file()
            if bundled and not pretrained:
                log.warning("no bundled weights for %s at %s: using random init "
                            "(train them with `make reference-model` or pass --checkpoint)",
                            name, reference_model.weights_path(name))
        model = _create(timm, name, pretrained, kwargs)
        source = ("bundled" if bundled else "timm-hub") if pretrained else "random-init"
        spec = ModelSpec(name, None, bool(pretrained), kwargs, source)
    model = model.float().eval()
    check_finite(model, spec.checkpoint or name)
    return model, spec


def _create(timm, name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:  # bad keyword for this architecture
        raise CompressError(f"cannot build {name} with {kwargs}: {e}") from None
    except FileNotFoundError as e:
        if name in reference_model.ARCHS:  # bundled weights missing
            raise CompressError(str(e)) from None
        raise CompressError(_hub_message(name, e)) from None
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
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt files raise many different types
        from .fileinfo import checkpoint_error

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


def _load_checkpoint(model: nn.Module, path: Path) -> None:
    state = _read_state_dict(path)
    own = model.state_dict()
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
