"""Sequential refinement of the factors, validated on held-out calibration images (beyond the paper).

After the whitened SVD (fitted on the dense network's statistics) every factorised layer sees,
inside the compressed network, inputs X~ that differ from the dense X: error accumulates through
the depth. This pass walks the network block by block, keeping for a *fit* split and a *held-out*
split of the calibration images the dense hidden states h and the compressed ones h~, and per
block tries up to two refinements, each judged on the held-out split only:

``seq`` -- sequential factorisation (METHOD.md §8). Layer by layer in forward order (so each
layer's X~ already comes from the refined earlier layers of the same block), the rank-r factors
are refitted to ``min ||W X - W' X~||``: with C~ = X~ X~^T (damped) = L L^T and D = X X~^T,
``W' = svd_r(T L) L^-1``, T = W D C~^-1. Only Grams; no stored activations.

``recon`` -- block-wise reconstruction: Adam on all the block's parameters (its factors, norms, layer
scales and layers left dense; ``recon_params`` "factors": its factors and their biases only) against the dense
block's outputs, ``min E || blk~(h~) - blk(h) ||^2 / E ||blk(h)||^2`` on minibatches of fit images
(no labels), cosine learning rate, best held-out iterate kept. Optionally (``readout``) the last
block is fitted and judged on what the head reads of it (final norm, pooling: a ViT's CLS token)
instead of every token, and (``readout_weight``) the other blocks on their tokens plus that readout;
on the real ViT-S/14 neither raised top-1 (README), so both are off by default.

A block keeps a refinement only if it lowers the block's held-out output error; the manifest
records every candidate's error and what was kept. ``refine_`` finally compares the whole
network's final features (pre-logits) on the held-out images with and without the kept refinements and reverts to the
plain factors when they do not pay end to end, so the result is never worse than its ablation
on images it was not fitted on.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from .lowrank import LowRankLinear, balance_factors_, lowrank_layers, replace_module_
from .models import features_and_logits, run_stage, stages
from .stats import accumulate_gram
from .svd import damped_cholesky

log = logging.getLogger(__name__)


RECON_PARAMS = ("factors", "block")


@dataclass(frozen=True)
class RefineConfig:
    seq: bool = True            # sequential refit of the factors
    recon_steps: int = 0        # block-wise reconstruction steps per block (0: off)
    recon_lr: float = 1e-2      # Adam step, relative to each tensor's RMS
    recon_batch: int = 16       # images per reconstruction step
    recon_params: str = "block"  # what reconstruction tunes: "block" (every parameter of the block: the factors,
                                # norms, layer scales, dense layers) or "factors" (low-rank factors and their biases)
    damping: float = 1e-2       # ridge of C~, relative to its mean diagonal
    readout: bool = False       # last stage: compare what the head reads (final norm, pooling), not every token
    readout_weight: float = 0.0  # other stages: add what the head would read of them, at this share of the tokens'
    seed: int = 0

    def __post_init__(self):
        if self.recon_params not in RECON_PARAMS:
            raise ValueError(f"recon_params must be one of {RECON_PARAMS}, got {self.recon_params!r}")

    @property
    def enabled(self) -> bool:
        return self.seq or self.recon_steps > 0


def fit_sequential(W: torch.Tensor, Ct: torch.Tensor, D: torch.Tensor, rank: int, damping: float,
                   name: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` A (m x r), B (r x n) minimising ||W X - A B X~||_F given C~ and D = X X~^T (float64)."""
    W, Ct, D = W.double(), Ct.double(), D.double()
    L, _ = damped_cholesky(Ct, damping, name)                        # C~ + lambda I = L L^T
    # T L = W D C~^-1 L = W D L^-T
    TL = torch.linalg.solve_triangular(L, (W @ D).T, upper=False).T
    U, S, Vh = torch.linalg.svd(TL, full_matrices=False)
    r = min(rank, S.numel())
    A = U[:, :r] * S[:r]
    B = torch.linalg.solve_triangular(L.T, Vh[:r].T, upper=True).T    # V_r^T L^-1
    return A.float(), B.float()


def _block_error(block: nn.Module, hs: list[torch.Tensor], targets: list[torch.Tensor], readout=None) -> float:
    """Relative squared error of ``block`` on ``hs`` against ``targets`` (read through ``readout``)."""
    num = den = 0.0
    with torch.no_grad():
        for x, t in zip(hs, targets):
            y = block(x)
            if readout is not None:
                y, t = readout(y), readout(t)
            num += float((y - t).double().pow(2).sum())
            den += float(t.double().pow(2).sum())
    return num / den if den > 0 else 0.0


def _dense_pass(dense_block: nn.Module, prefix: str, layers: list[str], h: list) -> tuple[list, dict]:
    """The dense block's outputs on ``h`` and, per batch, the inputs X of each of its ``layers``."""
    inputs: dict[str, list[torch.Tensor]] = {l: [] for l in layers}
    hooks = [dense_block.get_submodule(l[len(prefix) + 1:]).register_forward_pre_hook(
        lambda _m, i, l=l: inputs[l].append(i[0].reshape(-1, i[0].shape[-1]))) for l in layers]
    try:
        with torch.no_grad():
            outs = [dense_block(x) for x in h]
    finally:
        for hk in hooks:
            hk.remove()
    return outs, inputs


def _seq_refit_(dense_block: nn.Module, block: nn.Module, prefix: str, layers: list[str], inputs: dict,
                ht: list, damping: float) -> None:
    """Refit each LowRankLinear of ``block`` (names relative to the model) in forward order, in place.

    ``inputs[layer]``: the dense inputs X of the layer, per batch of ``ht`` (from ``_dense_pass``).
    """
    for full in layers:
        rel = full[len(prefix) + 1:]
        lin = dense_block.get_submodule(rel)
        mod = block.get_submodule(rel)
        if not isinstance(mod, LowRankLinear):
            continue
        n = lin.in_features
        Ct = torch.zeros(n, n, dtype=torch.float64)
        D = torch.zeros(n, n, dtype=torch.float64)
        got: dict[str, torch.Tensor] = {}
        hook = mod.register_forward_pre_hook(lambda _m, i: got.__setitem__("xt", i[0].reshape(-1, n)))
        try:
            with torch.no_grad():
                for x, xt in zip(inputs[full], ht):
                    block(xt)
                    accumulate_gram(Ct, got["xt"])
                    accumulate_gram(D, x, got["xt"])
        finally:
            hook.remove()
        A, B = fit_sequential(lin.weight.detach(), Ct, D, mod.rank + mod.comp_rank, damping, full)
        mod.first.weight.copy_(B)    # same width (and rank/compensation split), so the plan is unchanged
        mod.second.weight.copy_(A)


def _reconstruct_(block: nn.Module, ht: list, targets: list, val_ht: list, val_targets: list,
                  cfg: RefineConfig, start_error: float, readout=None) -> tuple[float, int]:
    """Adam on the block's low-rank factors and their biases; keeps the best held-out iterate.
    ``readout``: what of the block's output is compared (None: every token)."""
    out = readout or (lambda y: y)
    balance_factors_(block)
    params = [p for m in lowrank_layers(block).values() for p in m.parameters()]
    if params and cfg.recon_params == "block":
        params = list(block.parameters())
    if not params:
        return start_error, 0
    x_all = torch.cat(ht)
    with torch.no_grad():
        t_all = out(torch.cat(targets))
    energy = float(t_all.pow(2).mean())
    gen = torch.Generator().manual_seed(cfg.seed)
    scales = [float(p.detach().pow(2).mean().sqrt()) or 1.0 for p in params]
    opt = torch.optim.Adam([{"params": [p], "lr": cfg.recon_lr * s} for p, s in zip(params, scales)])
    base_lrs = [g["lr"] for g in opt.param_groups]
    best = (start_error, [p.detach().clone() for p in params], 0)
    check = max(1, cfg.recon_steps // 4)
    for p in params:
        p.requires_grad_(True)
    try:
        for step in range(1, cfg.recon_steps + 1):
            idx = torch.randint(len(x_all), (min(cfg.recon_batch, len(x_all)),), generator=gen)
            with torch.enable_grad():
                loss = (out(block(x_all[idx])) - t_all[idx]).pow(2).mean() / energy
                opt.zero_grad(set_to_none=True)
                loss.backward()
            if not torch.isfinite(loss):
                break
            f = 0.5 * (1 + math.cos(math.pi * step / cfg.recon_steps))
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * f
            opt.step()
            if step % check == 0 or step == cfg.recon_steps:
                err = _block_error(block, val_ht, val_targets, readout)
                if err < best[0]:
                    best = (err, [p.detach().clone() for p in params], step)
    finally:
        for p in params:
            p.requires_grad_(False)
    with torch.no_grad():
        for p, b in zip(params, best[1]):
            p.copy_(b)
    return best[0], best[2]


def _features(model: nn.Module, hs: list) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([run_stage(model, "features", x) for x in hs])


def output_cosine(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Mean and min cosine similarity of rows (per image) of ``y`` against ``ref``."""
    c = torch.nn.functional.cosine_similarity(y.double().flatten(1), ref.double().flatten(1), dim=1)
    return float(c.mean()), float(c.min())


@torch.no_grad()
def heldout_cosine(dense: nn.Module, model: nn.Module, images: list[torch.Tensor]) -> tuple[float, float]:
    """Mean and min final-feature cosine of ``model`` to ``dense`` on batches of preprocessed images."""
    ref = torch.cat([features_and_logits(dense, x)[0] for x in images])
    ours = torch.cat([features_and_logits(model, x)[0] for x in images])
    return output_cosine(ours, ref)


def _readout(dense: nn.Module, targets: list, last: bool, cfg: RefineConfig):
    """What of a stage's output the refinement compares (None: every token)."""
    feats = lambda y: run_stage(dense, "features", y)
    if last and cfg.readout:
        return feats
    if cfg.readout_weight <= 0:
        return None
    with torch.no_grad():
        tok = sum(float(t.double().pow(2).sum()) for t in targets)
        pooled = sum(float(feats(t).double().pow(2).sum()) for t in targets)
    c = math.sqrt(cfg.readout_weight * tok / max(pooled, 1e-30))
    return lambda y: torch.cat([y.flatten(1), c * feats(y)], 1)


@torch.no_grad()
def refine_(dense: nn.Module, compressed: nn.Module, fit_images: list[torch.Tensor],
            heldout_images: list[torch.Tensor], cfg: RefineConfig) -> dict:
    """Run the pass (module docstring) on batches of preprocessed images; edits ``compressed`` in place."""
    dense.eval()
    compressed.eval()
    plain = copy.deepcopy(compressed)
    h = [run_stage(dense, "embed", x) for x in fit_images]
    hv = [run_stage(dense, "embed", x) for x in heldout_images]
    ht, hvt = list(h), list(hv)
    hv_plain = list(hv)
    blocks = {}
    names = list(lowrank_layers(compressed))
    plan = [(s, ls) for s, ls in stages(dense, names) if s not in ("embed", "tail")]
    for stage, layers in tqdm(plan, desc="refinement", unit="block", mininterval=5, disable=None):
        dense_block = dense.get_submodule(stage)
        block = compressed.get_submodule(stage)
        targets, inputs = _dense_pass(dense_block, stage, layers if cfg.seq else [], h)
        readout = _readout(dense, targets, last=stage == plan[-1][0], cfg=cfg)
        val_targets = [dense_block(x) for x in hv]
        info = {}
        if layers:
            info["plain"] = _block_error(block, hvt, val_targets, readout)
            kept, best = "plain", info["plain"]
            if cfg.seq:
                cand = copy.deepcopy(block)
                _seq_refit_(dense_block, cand, stage, layers, inputs, ht, cfg.damping)
                info["seq"] = _block_error(cand, hvt, val_targets, readout)
                if info["seq"] < best:
                    kept, best = "seq", info["seq"]
                    replace_module_(compressed, stage, cand)
                    block = cand
            if cfg.recon_steps > 0:
                cand = copy.deepcopy(block)
                err, step = _reconstruct_(cand, ht, targets, hvt, val_targets, cfg, best, readout)
                info["recon"] = err
                info["recon_best_step"] = step
                if step > 0 and err < best:
                    kept, best = f"{kept}+recon" if kept != "plain" else "recon", err
                    replace_module_(compressed, stage, cand)
                    block = cand
            info["kept"] = kept
            log.info("%s: held-out block error %s -> kept %s", stage,
                     ", ".join(f"{k} {v:.4g}" for k, v in info.items() if isinstance(v, float)), kept)
        blocks[stage] = info
        ht = [block(x) for x in ht]
        hvt = [block(x) for x in hvt]
        hv_plain = [plain.get_submodule(stage)(x) for x in hv_plain]
        h, hv = targets, val_targets
        del inputs
    ref = _features(dense, hv)
    ours, base = _features(compressed, hvt), _features(plain, hv_plain)
    after, before = output_cosine(ours, ref), output_cosine(base, ref)
    kept = after[0] >= before[0]
    if not kept:
        log.warning("refinement lowered the held-out output cosine (%.4f -> %.4f): reverted to the plain factors",
                    before[0], after[0])
        for name, mod in lowrank_layers(plain).items():
            replace_module_(compressed, name, mod)
    return {"config": {"seq": cfg.seq, "recon_steps": cfg.recon_steps, "recon_lr": cfg.recon_lr,
                       "recon_batch": cfg.recon_batch, "recon_params": cfg.recon_params, "damping": cfg.damping,
                       "readout": cfg.readout, "readout_weight": cfg.readout_weight},
            "fit_images": sum(len(x) for x in fit_images), "heldout_images": sum(len(x) for x in heldout_images),
            "heldout_output_cosine_plain": {"mean": before[0], "min": before[1]},
            "heldout_output_cosine_refined": {"mean": after[0], "min": after[1]},
            "kept": kept, "blocks": blocks}
