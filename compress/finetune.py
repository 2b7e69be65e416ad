"""Optional recovery fine-tuning (beyond the paper): distil the dense model into the low-rank factors.

Only the factor weights of every LowRankLinear train: ``first`` = [B ; Y^T] and ``second`` =
[A , G] (the compensation G Y^T is stored inside the same two matrices, lowrank.py), so the
rank map and parameter count never change. Biases, embeddings, norms, the head and every
dense layer stay bit-identical. The loss is the distillation loss on logits

    T^2 KL(softmax(z_dense / T) || softmax(z_compressed / T))  [+ mse_weight * mean (z_c - z_d)^2]

on the calibration images only, with a random horizontal flip as the one augmentation (the
inputs are already normalised tensors; flipping commutes with the per-channel normalisation).
Before training, every pair is rebalanced so that inner channel j has equal norms in ``first``
(row j) and ``second`` (column j): a function-preserving rescaling (up to rounding) without
which Adam, whose step is about ``lr`` per element whatever the scale, would move the whitened
B (entries ~1e-3) a hundred times faster, relatively, than A (entries ~1).
The dense logits of every image and of its mirror are computed once up front, so a step costs
one forward and backward of the compressed model. Adam, cosine learning rate to 0, seeded
shuffling and flips: the same seed and thread count give bit-identical factors. Both models
stay in eval mode (no dropout / drop-path: the factors are the only thing that moves).
"""
from __future__ import annotations

import logging
import math
import time
from typing import Iterable

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from .errors import CompressError
from .lowrank import lowrank_layers

log = logging.getLogger(__name__)


def factor_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable tensors: first/second weights of every LowRankLinear (biases excluded)."""
    out = {}
    for name, mod in lowrank_layers(model).items():
        out[f"{name}.first.weight"] = mod.first.weight
        out[f"{name}.second.weight"] = mod.second.weight
    return out


@torch.no_grad()
def balance_factors_(model: nn.Module) -> None:
    """Rescale each inner channel j of every LowRankLinear so ||first[j, :]|| = ||second[:, j]||."""
    for mod in lowrank_layers(model).values():
        w1, w2 = mod.first.weight, mod.second.weight
        n1, n2 = w1.double().norm(dim=1), w2.double().norm(dim=0)
        d = torch.where((n1 > 0) & (n2 > 0), (n2 / n1.clamp_min(1e-300)).sqrt(), torch.ones_like(n1))
        w1.copy_((w1.double() * d[:, None]).to(w1.dtype))
        w2.copy_((w2.double() / d[None, :]).to(w2.dtype))


def kl_to_dense(logits: torch.Tensor, ref: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over images of T^2 KL(softmax(ref/T) || softmax(logits/T)), in nats."""
    t = temperature
    return F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(ref / t, -1), log_target=True,
                    reduction="batchmean") * t * t


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, batch_size: int, device: str) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])


def distill_(dense: nn.Module, compressed: nn.Module, batches: Iterable, steps: int, lr: float = 3e-5,
             temperature: float = 1.0, seed: int = 0, device: str = "cpu", mse_weight: float = 0.0,
             batch_size: int | None = None) -> dict:
    """Fine-tune ``compressed``'s low-rank factors in place towards ``dense``'s logits; returns a summary.

    ``batches`` yields (images, labels) or images (labels are never used); ``batch_size``
    defaults to the size of its first batch. Raises CompressError if the loss turns NaN/Inf
    (the factors are restored first) or if the model has no low-rank layers.
    """
    if steps < 1:
        raise CompressError(f"fine-tuning needs steps >= 1, got {steps}")
    if not lr > 0 or not temperature > 0 or not mse_weight >= 0:
        raise CompressError(f"fine-tuning needs lr > 0, temperature > 0, mse_weight >= 0 "
                            f"(got {lr}, {temperature}, {mse_weight})")
    params = factor_parameters(compressed)
    if not params:
        raise CompressError("nothing to fine-tune: the compressed model has no low-rank layers")
    xs = [(b[0] if isinstance(b, (tuple, list)) else b).detach().cpu() for b in batches]
    if not xs:
        raise CompressError("the fine-tuning loader yielded no images")
    bs = batch_size or len(xs[0])
    x = torch.cat(xs)
    n = len(x)
    t0 = time.perf_counter()

    dense.eval().to(device)
    compressed.eval().to(device)
    ref = _logits(dense, x, bs, device)
    ref_flip = _logits(dense, x.flip(-1), bs, device)   # the dense targets of the mirrored images
    before = _logits(compressed, x, bs, device)
    kl_before = float(kl_to_dense(before, ref))

    backup = {k: p.detach().clone() for k, p in params.items()}
    balance_factors_(compressed)
    grad_flags = {p: p.requires_grad for p in compressed.parameters()}
    for p in compressed.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(n, generator=gen), 0
    losses = []
    try:
        for step in tqdm(range(steps), desc="fine-tune (distillation)", unit="step", mininterval=5, disable=None):
            if pos + bs > n and pos > 0:          # a new epoch: reshuffle (the last short batch is dropped)
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos:pos + bs]
            pos += bs
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], x[idx].flip(-1), x[idx]).to(device)
            target = torch.where(flip[:, None], ref_flip[idx], ref[idx]).to(device)
            out = compressed(xb).float()
            loss = kl_to_dense(out, target, temperature)
            if mse_weight:
                loss = loss + mse_weight * F.mse_loss(out, target)
            if not torch.isfinite(loss):
                with torch.no_grad():
                    for k, p in params.items():
                        p.copy_(backup[k])
                raise CompressError(f"fine-tuning diverged: the loss is {float(loss.detach())} at step {step + 1} of "
                                    f"{steps} (lr {lr:g}); the factors were restored; try a smaller "
                                    "--finetune-lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    finally:
        for p, flag in grad_flags.items():
            p.requires_grad_(flag)
        for p in params.values():
            p.grad = None
    compressed.eval()
    after = _logits(compressed, x, bs, device)
    kl_after = float(kl_to_dense(after, ref))
    seconds = time.perf_counter() - t0
    if not math.isfinite(kl_after):
        raise CompressError(f"fine-tuning produced non-finite outputs (KL {kl_after}); try a smaller --finetune-lr")
    if kl_after >= kl_before:
        log.warning("fine-tuning did not lower the KL to the dense model (%.4g -> %.4g); try another "
                    "--finetune-lr or more steps", kl_before, kl_after)
    agree = lambda y: float((y.argmax(1) == ref.argmax(1)).double().mean())  # noqa: E731
    summary = {"steps": steps, "lr": lr, "temperature": temperature, "mse_weight": mse_weight, "seed": seed,
               "batch_size": bs, "images": n, "epochs": round(steps * bs / n, 2), "augmentation": "hflip",
               "trained": "low-rank factors (first/second weights, compensation included; biases frozen)",
               "trained_params": sum(p.numel() for p in params.values()),
               "seconds": round(seconds, 3), "loss_first": losses[0], "loss_last": losses[-1],
               "kl_before": kl_before, "kl_after": kl_after,
               "top1_agreement_before": agree(before), "top1_agreement_after": agree(after)}
    log.info("fine-tuning: %d steps in %.1f s, KL to the dense model on %d calibration images %.4g -> %.4g",
             steps, seconds, n, kl_before, kl_after)
    return summary
