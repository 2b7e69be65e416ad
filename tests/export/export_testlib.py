"""Helpers for the export tests (a module name no other test folder uses)."""
from __future__ import annotations

import copy

import torch
from timm.models.vision_transformer import VisionTransformer

from compress.zoo import reference as ref
from compress.lowrank import LowRankLinear, lowrank_layers, replace_module_

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)


def tiny_vit(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(**TINY).eval()
    with torch.no_grad():
        for p in model.parameters():  # timm zero-inits biases; real models have nonzero ones
            if p.ndim == 1:
                p.add_(0.02 * torch.randn_like(p))
    cfg = ref.data_config()
    model.pretrained_cfg = model.default_cfg = cfg
    return model


def compress_like(dense, rank_frac: float = 0.25, comp_rank: int = 2, skip=("blocks.1.attn.proj",),
                  seed: int = 1):
    """Copy of ``dense`` with block Linears replaced by rank-r SVD pairs (+ comp_rank compensation)."""
    gen = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(dense)
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, torch.nn.Linear) or not name.startswith("blocks.") or name in skip:
            continue
        W = mod.weight.detach().double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        r = max(1, int(rank_frac * min(W.shape)))
        A, B = U[:, :r] * S[:r], Vh[:r]
        G = 0.05 * torch.randn(W.shape[0], comp_rank, generator=gen, dtype=torch.float64)
        Y = 0.05 * torch.randn(W.shape[1], comp_rank, generator=gen, dtype=torch.float64)
        replace_module_(model, name, LowRankLinear.from_factors(A, B, mod.bias.detach(), G, Y))
    return model.eval()


def expected_pairs(model) -> dict[str, tuple[int, int, int]]:
    return {n: (m.in_features, m.rank + m.comp_rank, m.out_features) for n, m in lowrank_layers(model).items()}


def write_compressed_dir(out, dense, model, ranges, dense_ranges, name="vit_cifar_ref", kwargs=None,
                         calibration=None):
    """A compress-stage artifact for ``model`` via compress.artifact.save_compressed; the dense
    original goes to a checkpoint beside it so load_model rebuilds exactly ``dense``."""
    from pathlib import Path

    from safetensors.torch import save_file

    from compress.artifact import save_compressed

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt = out.parent / f"{out.name}-dense.safetensors"
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(ckpt))
    lr = lowrank_layers(model)
    layers = {}
    for n, m in dense.named_modules():
        if isinstance(m, torch.nn.Linear) and n.startswith("blocks."):
            low = lr.get(n)
            params = low.num_params if low else sum(p.numel() for p in m.parameters())
            layers[n] = {"in": m.in_features, "out": m.out_features, "bias": m.bias is not None,
                         "rank": low.rank if low else min(m.weight.shape), "comp_rank": low.comp_rank if low else 0,
                         "dense": low is None, "params": params,
                         "dense_params": sum(p.numel() for p in m.parameters()), "error": 0.0}
    before, after = (sum(p.numel() for p in x.parameters()) for x in (dense, model))
    manifest = {
        "model": {"name": name, "checkpoint": str(ckpt), "pretrained": False, "kwargs": kwargs or {},
                  "weights": "checkpoint"},
        "method": "svd", "allocation": "test", "granule": 1, "comp_rank": 2,
        "budget": {"kind": "ratio", "value": after / before, "target_params": after, "description": "test"},
        "params": {"before": before, "after": after, "removed_ratio": 1 - after / before,
                   "compressible_before": before, "compressible_after": after,
                   "compressible_removed_ratio": 1 - after / before},
        "layers": layers,
        "quant": {"enabled": True, "weights": "int8", "activations": "int8", "calibration": "min-max",
                  "act_ranges": ranges, "dense_act_ranges": dense_ranges},
    }
    if calibration is not None:
        manifest["calibration"] = calibration
    return save_compressed(out, model, manifest)
