"""The project's own trained reference ViTs for 32x32 CIFAR-10, registered with timm.

Model hubs are unreachable on many build and edge machines, and random weights say
nothing about accuracy (a random matrix has a flat spectrum), so the toolchain ships a
real trained ViT. It is a plain timm ``VisionTransformer`` with DeiT's Linear layout
(qkv, proj, fc1, fc2, head); only patch size and width are chosen for 32 px inputs.
After ``import compress`` it is created like any timm model::

    timm.create_model("vit_cifar_ref", pretrained=True)   # bundled weights, offline
"""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from .pretrained import ZooCfg, pretrained_cfg

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

# name -> VisionTransformer arguments. vit_cifar_narrow is the smaller dense model the
# compressed reference is compared against at equal parameter count.
ARCHS = {
    "vit_cifar_ref": dict(embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0),
    "vit_cifar_narrow": dict(embed_dim=128, depth=6, num_heads=2, mlp_ratio=4.0),
}


def data_config() -> dict:
    """timm pretrained_cfg for the CIFAR models: 32 px, no crop, CIFAR statistics; ``calibration``
    / ``evaluation`` name their default image sets (the bundled CIFAR-10 ones)."""
    return dict(input_size=(3, 32, 32), crop_pct=1.0, crop_mode="center",
                interpolation="bicubic", mean=CIFAR10_MEAN, std=CIFAR10_STD,
                num_classes=10, label_names=CIFAR10_CLASSES, calibration="cifar10-calib", evaluation="cifar10-eval")


default_cfgs = generate_default_cfgs({name: ZooCfg(**data_config(), architecture=name) for name in ARCHS})


def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.safetensors"


def build(name: str, pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Build a registered CIFAR ViT; ``pretrained`` loads the bundled safetensors file."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)  # timm.create_model passes these to every constructor
    args = dict(img_size=32, patch_size=4, num_classes=10, **ARCHS[name])
    args.update(kwargs)
    model = VisionTransformer(**args)
    model.pretrained_cfg = model.default_cfg = pretrained_cfg(name)
    if pretrained:
        path = weights_path(name)
        if not path.is_file():
            raise FileNotFoundError(
                f"no bundled weights for {name} at {path}; train them with "
                f"`make reference-model` or pass --checkpoint")

        state = {k: v.float() for k, v in load_file(str(path)).items()}
        model.load_state_dict(state)
    return model


@register_model
def vit_cifar_ref(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Reference ViT (2.7M params): patch 4, width 192, 6 blocks, 3 heads, 32 px."""
    return build("vit_cifar_ref", pretrained, **kwargs)


@register_model
def vit_cifar_narrow(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Narrower ViT (1.2M params) trained with the same recipe, for size-matched comparisons."""
    return build("vit_cifar_narrow", pretrained, **kwargs)
