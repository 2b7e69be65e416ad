"""Tiny random-init models of every adapter family (adapters.py), as user entry points and timm specs.

Entry points (``--model tests.compress.family_models:torch_vit``) return an nn.Module with its
weights; the timm rows are (name, kwargs) for ``timm.create_model``. All are a few thousand
parameters at 32-64 px so a whole compress -> export -> eval run takes seconds.
"""
from __future__ import annotations

import torch
from torch import nn

CIFAR_CFG = dict(input_size=(3, 32, 32), mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), crop_pct=1.0,
                 interpolation="bicubic")

# name -> (timm name, kwargs): one row per timm family variant
TIMM = {
    "vit": ("vit_cifar_ref", dict(depth=2, embed_dim=32, num_heads=2)),
    "deit3": ("deit3_small_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                              num_classes=10)),
    "deit-distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                                               num_heads=2, num_classes=10)),
    "dinov2-reg": ("vit_small_patch14_reg4_dinov2", dict(img_size=56, embed_dim=32, depth=2, num_heads=2)),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=56, embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                                                  window_size=7, num_classes=10)),
    "swinv2": ("swinv2_tiny_window8_256", dict(img_size=64, embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                                               window_size=8, num_classes=10)),
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=56, embed_dim=32, depth=2, num_heads=2, num_classes=10,
                                             head_init_scale=1.0)),
    "beit": ("beit_base_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                           num_classes=10, head_init_scale=1.0)),
}


class TorchViT(nn.Module):
    """A ViT on torch.nn.TransformerEncoder: conv patches, CLS token, learned positions, pre/post-norm."""

    def __init__(self, img_size=32, patch=8, dim=32, depth=2, heads=2, num_classes=10, norm_first=True,
                 batch_first=True):
        super().__init__()
        self.batch_first = batch_first
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, (img_size // patch) ** 2 + 1, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, activation="gelu",
                                           batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(dim) if norm_first else None,
                                             enable_nested_tensor=False)
        self.head = nn.Linear(dim, num_classes) if num_classes else nn.Identity()

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        if not self.batch_first:
            x = x.transpose(0, 1)
        x = self.encoder(x)
        cls = x[:, 0] if self.batch_first else x[0]
        return self.head(cls)


def _nonzero_biases_(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.add_(0.02 * torch.randn_like(p))
    return model


def torch_vit(**kwargs) -> nn.Module:
    """Pre-norm, batch-first, with a declared timm-style data config."""
    model = _nonzero_biases_(TorchViT(**kwargs))
    model.pretrained_cfg = dict(CIFAR_CFG)
    return model


def torch_vit_postnorm(**kwargs) -> nn.Module:
    """Post-norm, sequence-first, no data config (preprocessing comes from the CLI overrides)."""
    return _nonzero_biases_(TorchViT(norm_first=False, batch_first=False, **kwargs))


def _vit_config(**kw):
    from transformers import ViTConfig

    args = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, num_labels=10)
    args.update(kw)
    return ViTConfig(**args)


def hf_vit_classifier(**kw) -> nn.Module:
    from transformers import ViTForImageClassification

    model = _nonzero_biases_(ViTForImageClassification(_vit_config(**kw)))
    model.pretrained_cfg = dict(CIFAR_CFG)
    return model


def hf_vit_model(**kw) -> nn.Module:
    """Headless, with its pooler (dense + tanh over the CLS token)."""
    from transformers import ViTModel

    return _nonzero_biases_(ViTModel(_vit_config(**kw)))


def hf_dinov2(**kw) -> nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    args = dict(image_size=28, patch_size=7, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                mlp_ratio=2)
    args.update(kw)
    model = _nonzero_biases_(Dinov2Model(Dinov2Config(**args)))
    model.pretrained_cfg = dict(CIFAR_CFG, input_size=(3, 28, 28))
    return model
