"""Model families: where the blocks, the compressible Linears, the embedding and the tail of each live.

One adapter per family, chosen by ``isinstance`` on the model's real class (never by its name):

=============  ===============================================  ==========================================
family         classes                                          stages (real submodules, forward order)
=============  ===============================================  ==========================================
timm-vit       timm VisionTransformer (ViT, DeiT, DeiT-3,       ``blocks.<i>``
               DINOv2, distilled DeiT: a subclass)
timm-swin      timm SwinTransformer, SwinTransformerV2          ``layers.<i>.downsample`` (patch merging,
                                                                from stage 1 on), ``layers.<i>.blocks.<j>``
timm-eva       timm Eva (EVA-02: SwiGLU MLP, rotary embedding)  ``blocks.<i>``
timm-beit      timm Beit                                        ``blocks.<i>``
torch          any module holding nn.TransformerEncoderLayer    the layers (``encoder.layers.<i>`` ...)
               (pre- or post-norm; nn.TransformerEncoder)
hf-vit         transformers ViTModel, ViTForImageClassification,the layers (``hf.vit.layers.<i>``,
               Dinov2Model (wrapped in ``HFImageModel``)        ``hf.encoder.layer.<i>`` ...)
=============  ===============================================  ==========================================

Every stage is a real submodule called as ``stage(tokens) -> tokens``, and running ``embed``, the
stages and ``tail`` in order is the model's forward exactly (tested per family). ``prepare_``
makes that true where a family's code does not: Eva's blocks get their rotary embedding bound
(it is passed by the model's loop), BEiT/EVA/Swin-v2 attention adds its q/v bias after calling
``qkv`` instead of reading ``qkv.weight`` in ``F.linear``, ``nn.TransformerEncoderLayer`` is
rebuilt from called Linears (unfused.py) and a Hugging Face model is wrapped so it returns a
tensor. The rewrites keep outputs equal (1e-5) and the state dict keys of timm models.

Embedding: everything the forward computes before the first stage (read with a hook at the first
stage's input, so it is exactly the model's own code: patch embedding, class/register tokens,
position table, pre-norm). Tail: what follows the last stage (final norm, pooling, head), which
the timm and Hugging Face adapters call directly and the torch adapter runs by feeding tokens in
place of the last layer's output. Compressible Linears: every nn.Linear inside a stage that
multiplies tokens (Swin-v2's continuous position-bias MLP reads a constant table and is left out);
the classifier may be added with ``include_head``.
"""
from __future__ import annotations

import contextlib
import fnmatch
import inspect
import logging
import sys

import torch
import torch.nn.functional as F
from timm.models.beit import Beit
from timm.models.eva import Eva
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer_v2 import SwinTransformerV2
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .errors import CompressError
from .unfused import UnfusedEncoderLayer, unfuse_

log = logging.getLogger(__name__)


class _Stop(BaseException):
    """Ends a forward early with a tensor (BaseException: user code's ``except Exception`` passes it on)."""

    def __init__(self, value):
        super().__init__()
        self.value = value


def input_of(model: nn.Module, module: nn.Module, x: torch.Tensor, what: str = "") -> torch.Tensor:
    """The first positional input ``module`` receives while ``model(x)`` runs (the rest is skipped)."""
    def stop(_m, args):
        raise _Stop(args[0])

    handle = module.register_forward_pre_hook(stop, prepend=True)
    try:
        model(x)
    except _Stop as s:
        return s.value
    finally:
        handle.remove()
    raise CompressError(f"{type(model).__name__}'s forward never calls {what or type(module).__name__}")


class _StandIn(nn.Module):
    """Takes a layer's place for one call: returns its input, or ``value`` when given. Other attributes
    are the original layer's (nn.TransformerEncoder reads ``layers[0].self_attn.batch_first``)."""

    def __init__(self, original: nn.Module, value: torch.Tensor | None = None):
        super().__init__()
        object.__setattr__(self, "_original", original)
        object.__setattr__(self, "_value", value)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)

    def forward(self, x, *args, **kwargs):
        return x if self._value is None else self._value


@contextlib.contextmanager
def _swapped(model: nn.Module, replacements: dict[str, nn.Module]):
    """Temporarily put other modules at the given qualified names."""
    saved = []
    try:
        for name, mod in replacements.items():
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            saved.append((owner, child, owner._modules[child]))
            owner._modules[child] = mod
        yield
    finally:
        for owner, child, mod in reversed(saved):
            owner._modules[child] = mod


def _names_of(model: nn.Module, targets) -> list[str]:
    ids = {id(t) for t in targets}
    return [n for n, m in model.named_modules() if id(m) in ids]


# ----------------------------------------------------------------------------- base
class Adapter:
    """One family's facts. Subclasses set ``family``/``classes`` and override what differs."""
    family = ""
    framework = ""                 # whose checkpoint conventions apply ("timm", "transformers", "torch")
    exclude: tuple[str, ...] = ()  # fnmatch patterns (relative to a stage) of Linears that see no tokens

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    # --- structure
    def prepare_(self, model: nn.Module) -> nn.Module:
        """Rewrite ``model`` (in place where possible) so its stages are callable alone; idempotent."""
        return model

    def check_prepared(self, model: nn.Module) -> None:
        """CompressError when ``model`` still needs ``prepare_`` (compress.models.prepare)."""

    def stage_names(self, model: nn.Module) -> list[str]:
        raise NotImplementedError

    def stage_linears(self, model: nn.Module, stage: str) -> list[str]:
        """Qualified names of the compressible Linears of one stage, in module (= forward) order."""
        out = []
        for rel, mod in model.get_submodule(stage).named_modules():
            if isinstance(mod, nn.Linear) and rel and not any(fnmatch.fnmatch(rel, p) for p in self.exclude):
                out.append(f"{stage}.{rel}")
        return out

    def excluded_linears(self, model: nn.Module) -> set[str]:
        """Linears inside the stages that multiply a constant, not tokens (never compressed or quantized)."""
        out = set()
        for stage in self.stage_names(model):
            for rel, mod in model.get_submodule(stage).named_modules():
                if isinstance(mod, nn.Linear) and any(fnmatch.fnmatch(rel, p) for p in self.exclude):
                    out.add(f"{stage}.{rel}")
        return out

    def head_names(self, model: nn.Module) -> list[str]:
        """The classifier Linear(s) (empty for a headless model)."""
        raise NotImplementedError

    def input_size(self, model: nn.Module) -> tuple[int, int, int] | None:
        """(C, H, W) the built model takes, when the architecture fixes it."""
        return None

    # --- running
    def embed(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        first = self.stage_names(model)[0]
        return input_of(model, model.get_submodule(first), x, first)

    def tail(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --- checkpoints
    def default_pos_interpolation(self) -> str:
        return "bicubic-antialias"

    def filter_checkpoint(self, model: nn.Module, state: dict, interpolation: str) -> dict:
        """``state`` adapted to ``model`` the way the checkpoint's framework does it (position tables
        of another grid resampled with ``interpolation``); unchanged where the family has no rule."""
        return state


def _timm_filter(model: nn.Module, state: dict, interpolation: str) -> dict:
    """timm's own ``checkpoint_filter_fn`` of the model's family (the one timm.create_model applies to
    pretrained weights: foreign layouts converted, position tables resampled to the model's grid)."""
    fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if fn is None:
        return state
    params = inspect.signature(fn).parameters
    mode, _, aa = interpolation.partition("-")
    kwargs = {}
    if "interpolation" in params:
        kwargs["interpolation"] = mode
    if "antialias" in params:
        kwargs["antialias"] = bool(aa)
    if not kwargs and interpolation != "bicubic-antialias":
        raise CompressError(f"timm's {type(model).__name__} checkpoint filter has a fixed interpolation; "
                            f"--pos-interpolation {interpolation} cannot apply (use auto)")
    return fn(dict(state), model, **kwargs)


class TimmAdapter(Adapter):
    """Shared by the timm families: ``forward_features`` ends with ``norm``, ``forward_head`` pools and
    classifies, ``get_classifier()`` is the head."""
    framework = "timm"

    def head_names(self, model):
        head = model.get_classifier()
        heads = [h for h in (head if isinstance(head, (tuple, list)) else (head,)) if isinstance(h, nn.Linear)]
        return _names_of(model, heads)

    def input_size(self, model):
        pe = getattr(model, "patch_embed", None)
        size = getattr(pe, "img_size", None)
        proj = getattr(pe, "proj", None)
        if size is None or getattr(pe, "dynamic_img_size", False):
            return None
        size = (size, size) if isinstance(size, int) else tuple(size)
        chans = getattr(proj, "in_channels", None) or getattr(model, "in_chans", 3)
        return (int(chans), int(size[0]), int(size[1]))

    def tail(self, model, x):
        return model.forward_head(model.norm(x))

    def features(self, model, x):
        return model.forward_head(model.norm(x), pre_logits=True)

    def filter_checkpoint(self, model, state, interpolation):
        return _timm_filter(model, state, interpolation)


def _separate_qkv_bias_(model: nn.Module) -> None:
    """Attention that adds q/v biases by ``F.linear(x, self.qkv.weight, bias)`` (BEiT, EVA, Swin-v2)
    takes its other, equal branch ``qkv = self.qkv(x); qkv += bias``: the Linear is then called."""
    for m in model.modules():
        if getattr(m, "q_bias", None) is not None and hasattr(m, "qkv_bias_separate") \
                and isinstance(getattr(m, "qkv", None), nn.Linear):
            m.qkv_bias_separate = True


def _check_separate_qkv_bias(model: nn.Module) -> None:
    for n, m in model.named_modules():
        if getattr(m, "q_bias", None) is not None and not getattr(m, "qkv_bias_separate", True):
            raise CompressError(f"{n}.qkv is read by F.linear, not called: prepare the model first "
                                "(compress.models.prepare, which load_model applies)")


class TimmViTAdapter(TimmAdapter):
    """timm VisionTransformer and subclasses (DeiT, DeiT-3, DINOv2, distilled DeiT, the bundled models).
    Embedding: patch_embed, _pos_embed (cls/register tokens, position table), patch_drop, norm_pre."""
    family = "timm-vit"

    @classmethod
    def matches(cls, model):
        return isinstance(model, VisionTransformer)

    def stage_names(self, model):
        return [f"blocks.{i}" for i in range(len(model.blocks))]


class TimmSwinAdapter(TimmAdapter):
    """timm Swin v1/v2. A stage of the network (``layers.<i>``) is patch merging (from the second on)
    then its blocks; each is a stage here, so the Linear of patch merging (``downsample.reduction``)
    is compressible too. Tokens are NHWC. Swin-v2's ``cpb_mlp`` (position-bias MLP over a constant
    coordinate table) is excluded. Embedding: patch_embed."""
    family = "timm-swin"
    exclude = ("*cpb_mlp*",)

    @classmethod
    def matches(cls, model):
        return isinstance(model, (SwinTransformer, SwinTransformerV2))

    def prepare_(self, model):
        _separate_qkv_bias_(model)
        return model

    def check_prepared(self, model):
        _check_separate_qkv_bias(model)

    def stage_names(self, model):
        out = []
        for i, layer in enumerate(model.layers):
            if not isinstance(layer.downsample, nn.Identity):
                out.append(f"layers.{i}.downsample")
            out += [f"layers.{i}.blocks.{j}" for j in range(len(layer.blocks))]
        return out


def _bind_rope(module, args, kwargs):
    """Forward pre-hook of an Eva block: the model's rotary embedding when the caller passes none."""
    if kwargs.get("rope") is None and len(args) < 2:
        kwargs = dict(kwargs, rope=module.bound_rope)
    return args, kwargs


class TimmEvaAdapter(TimmAdapter):
    """timm Eva (EVA, EVA-02 with SwiGLU MLPs and rotary position embedding). The model passes the
    rotary embedding to every block; ``prepare_`` stores it in each block (a non-persistent buffer)
    so a block called alone computes what it does inside the model. Embedding: patch_embed,
    _pos_embed, norm_pre."""
    family = "timm-eva"

    @classmethod
    def matches(cls, model):
        return isinstance(model, Eva)

    def prepare_(self, model):
        _separate_qkv_bias_(model)
        if model.rope is None:
            return model
        if getattr(model, "dynamic_img_size", False):
            raise CompressError("Eva with dynamic_img_size has no fixed rotary embedding to bind; build it "
                                "with a fixed img_size")
        with torch.no_grad():
            rope = model.rope.get_embed() if hasattr(model.rope, "feat_shape") else \
                model.rope.get_embed(shape=model.patch_embed.grid_size)
        mixed = getattr(model, "rope_mixed", False)
        for i, blk in enumerate(model.blocks):
            if "bound_rope" not in blk._buffers:
                blk.register_buffer("bound_rope", rope[i] if mixed else rope, persistent=False)
                blk.register_forward_pre_hook(_bind_rope, with_kwargs=True)
        return model

    def stage_names(self, model):
        return [f"blocks.{i}" for i in range(len(model.blocks))]

    def check_prepared(self, model):
        _check_separate_qkv_bias(model)
        if model.rope is not None and any("bound_rope" not in b._buffers for b in model.blocks):
            raise CompressError("Eva's blocks have no bound rotary embedding: prepare the model first "
                                "(compress.models.prepare, which load_model applies)")


class TimmBeitAdapter(TimmAdapter):
    """timm Beit (per-block relative position bias). Embedding: patch_embed, cls token, position table."""
    family = "timm-beit"

    @classmethod
    def matches(cls, model):
        return isinstance(model, Beit)

    def prepare_(self, model):
        if model.rel_pos_bias is not None:
            raise CompressError("BEiT with a shared relative position bias (use_shared_rel_pos_bias) is not "
                                "supported: its blocks take the bias from the model")
        _separate_qkv_bias_(model)
        return model

    def check_prepared(self, model):
        _check_separate_qkv_bias(model)

    def stage_names(self, model):
        return [f"blocks.{i}" for i in range(len(model.blocks))]


# ----------------------------------------------------------------------------- torch
class TorchAdapter(Adapter):
    """A model built on ``nn.TransformerEncoderLayer`` (inside ``nn.TransformerEncoder``, a ModuleList
    or a Sequential). The layers must be consecutive children of one container: embedding is what
    the forward computes before the first, tail what it computes after the last (the encoder's
    final norm included). The classifier is the Linear outside the layers whose output the model
    returns (found once by a probe forward); without one the model is headless."""
    family = "torch"
    framework = "torch"

    @classmethod
    def matches(cls, model):
        return any(isinstance(m, (nn.TransformerEncoderLayer, UnfusedEncoderLayer)) for m in model.modules())

    def prepare_(self, model):
        if isinstance(model, nn.TransformerEncoderLayer):
            raise CompressError("a bare nn.TransformerEncoderLayer is not a model: give the module that "
                                "embeds the images, runs the layers and classifies")
        unfuse_(model)
        self.stage_names(model)   # validates the layout
        return model

    def check_prepared(self, model):
        raw = [n for n, m in model.named_modules() if isinstance(m, nn.TransformerEncoderLayer)]
        if raw:
            raise CompressError(f"{raw[0]} is an nn.TransformerEncoderLayer (its attention reads in_proj_weight "
                                "directly): prepare the model first (compress.models.prepare, which load_model "
                                "applies)")

    def stage_names(self, model):
        names = [n for n, m in model.named_modules() if isinstance(m, UnfusedEncoderLayer)]
        parents = {n.rpartition(".")[0] for n in names}
        if len(parents) != 1:
            raise CompressError(f"{type(model).__name__} has encoder layers in {len(parents)} containers "
                                f"({', '.join(sorted(parents)[:3])}); one stack of layers is supported")
        return names

    def _batch_first(self, model):
        return model.get_submodule(self.stage_names(model)[0]).self_attn.batch_first

    def _dummy(self, model, tokens):
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
        if not size:
            raise CompressError(f"{type(model).__name__}: the tail is run through the model's forward, which "
                                "needs its input size (--input-size, or a pretrained_cfg input_size)")
        batch = tokens.shape[0 if self._batch_first(model) else 1]
        return torch.zeros(batch, *size, dtype=tokens.dtype, device=tokens.device)

    def _run_after_layers(self, model, tokens, stop_at: nn.Module | None = None):
        names = self.stage_names(model)
        swap = {n: _StandIn(model.get_submodule(n)) for n in names[:-1]}
        swap[names[-1]] = _StandIn(model.get_submodule(names[-1]), tokens)
        x = self._dummy(model, tokens)
        with _swapped(model, swap):
            if stop_at is not None:
                return input_of(model, stop_at, x, "its classifier")
            return model(x)

    def head_names(self, model):
        if "_vit_edge_head" not in model.__dict__:
            model.__dict__["_vit_edge_head"] = self._probe_head(model)
        head = model.__dict__["_vit_edge_head"]
        return [head] if head else []

    def _probe_head(self, model) -> str | None:
        inside = tuple(f"{n}." for n in self.stage_names(model))
        outputs = {}
        hooks = [m.register_forward_hook(lambda mod, _i, out, name=n: outputs.__setitem__(name, out))
                 for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith(inside)]
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
        if not size:
            raise CompressError(f"{type(model).__name__}: finding its classifier needs its input size "
                                "(--input-size, or a pretrained_cfg input_size)")
        try:
            with torch.no_grad():
                p = next(model.parameters())
                y = model(torch.zeros(1, *size, dtype=p.dtype, device=p.device))
        finally:
            for h in hooks:
                h.remove()
        found = [n for n, out in outputs.items() if out is y]
        return found[-1] if found else None

    def tail(self, model, x):
        return self._run_after_layers(model, x)

    def features(self, model, x):
        head = self.head_names(model)
        if not head:
            return self._run_after_layers(model, x)
        return self._run_after_layers(model, x, stop_at=model.get_submodule(head[0]))

    def default_pos_interpolation(self):
        return "none"


# ----------------------------------------------------------------------------- Hugging Face
class HFImageModel(nn.Module):
    """A transformers ViT/DINOv2 model as a plain module: images -> logits (ViTForImageClassification)
    or, headless, the pooled features (ViTModel: its pooler's output, or the normalised CLS token
    without a pooler; Dinov2Model: the normalised CLS token, its ``pooler_output``)."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.hf(pixel_values=x)
        if hasattr(out, "logits"):
            return out.logits
        if getattr(out, "pooler_output", None) is not None:
            return out.pooler_output
        return out.last_hidden_state[:, 0]


def _hf_classes():
    from transformers import Dinov2Model, ViTForImageClassification, ViTModel  # lazy: the optional [hf] extra

    return ViTModel, ViTForImageClassification, Dinov2Model


class HFViTAdapter(Adapter):
    """transformers ViTModel / ViTForImageClassification / Dinov2Model, wrapped in HFImageModel.
    Blocks: the encoder layers (separate q/k/v/o Linears and the MLP's). Tail: final layernorm, CLS
    token, pooler or classifier."""
    family = "hf-vit"
    framework = "transformers"

    @classmethod
    def matches(cls, model):
        try:
            classes = _hf_classes()
        except ImportError:
            return False
        inner = model.hf if isinstance(model, HFImageModel) else model
        return isinstance(inner, classes)

    def prepare_(self, model):
        if isinstance(model, HFImageModel):
            return model
        cfg = model.config
        if getattr(cfg, "_attn_implementation", None) not in ("eager", "sdpa"):
            cfg._attn_implementation = "sdpa"   # flash/flex kernels do not export to ONNX
        wrapped = HFImageModel(model)
        declared = getattr(model, "pretrained_cfg", None)   # a data config the user attached
        if isinstance(declared, dict):
            wrapped.pretrained_cfg = dict(declared)
        return wrapped

    def check_prepared(self, model):
        if not isinstance(model, HFImageModel):
            raise CompressError(f"a transformers {type(model).__name__} returns a ModelOutput: wrap it first "
                                "(compress.models.prepare, which load_model applies)")

    def _base(self, model):
        ViTModel, ViTForImageClassification, _ = _hf_classes()
        hf = model.hf
        return (hf.vit if isinstance(hf, ViTForImageClassification) else hf), "hf.vit" if \
            isinstance(hf, ViTForImageClassification) else "hf"

    def stage_names(self, model):
        base, prefix = self._base(model)
        if hasattr(base, "layers"):
            return [f"{prefix}.layers.{i}" for i in range(len(base.layers))]
        return [f"{prefix}.encoder.layer.{i}" for i in range(len(base.encoder.layer))]

    def head_names(self, model):
        cls = getattr(model.hf, "classifier", None)
        return ["hf.classifier"] if isinstance(cls, nn.Linear) else []

    def input_size(self, model):
        cfg = model.hf.config
        size = cfg.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (int(cfg.num_channels), int(size[0]), int(size[1]))

    def features(self, model, x):
        base, _ = self._base(model)
        x = base.layernorm(x)
        pooler = getattr(base, "pooler", None)
        return pooler(x) if pooler is not None else x[:, 0]

    def tail(self, model, x):
        f = self.features(model, x)
        cls = getattr(model.hf, "classifier", None)
        return cls(f) if cls is not None else f

    def default_pos_interpolation(self):
        return "bicubic"

    def filter_checkpoint(self, model, state, interpolation):
        """Position tables of another grid resampled as transformers' ``interpolate_pos_encoding`` does
        (``F.interpolate(..., mode="bicubic", align_corners=False)``, CLS row kept)."""
        own = model.state_dict()
        out = dict(state)
        mode, _, aa = interpolation.partition("-")
        for k, v in state.items():
            if not k.endswith("embeddings.position_embeddings") or k not in own or own[k].shape == v.shape:
                continue
            n_old, n_new = v.shape[1] - 1, own[k].shape[1] - 1
            old, new = round(n_old ** 0.5), round(n_new ** 0.5)
            if old * old != n_old or new * new != n_new:
                continue   # not a square grid: left to the shape check
            grid = v[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
            grid = F.interpolate(grid, size=(new, new), mode=mode, antialias=bool(aa),
                                 align_corners=None if mode == "nearest" else False)
            out[k] = torch.cat([v[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new * new, -1).to(v.dtype)], dim=1)
        return out


# Most specific first: a model is taken by the first adapter that matches it.
ADAPTERS: tuple[type[Adapter], ...] = (TimmViTAdapter, TimmSwinAdapter, TimmEvaAdapter, TimmBeitAdapter,
                                       HFViTAdapter, TorchAdapter)


def find_adapter(model: nn.Module) -> Adapter | None:
    for cls in ADAPTERS:
        if cls.matches(model):
            return cls()
    return None


def supported() -> str:
    return ("timm VisionTransformer (ViT/DeiT/DeiT-3/DINOv2), timm Swin v1/v2, timm Eva (EVA-02), timm Beit, "
            "models built on torch.nn.TransformerEncoderLayer, transformers ViTModel/ViTForImageClassification/"
            "Dinov2Model")
