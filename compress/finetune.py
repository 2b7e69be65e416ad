"""Optional recovery fine-tuning (beyond the paper): distil the dense model into the low-rank factors.

Only the factor weights of every LowRankLinear train: ``first`` = [B ; Y^T] and ``second`` =
[A , G] (the compensation G Y^T is stored inside the same two matrices, lowrank.py), so the
rank map and parameter count never change. Biases, embeddings, norms, the head and every
dense layer stay bit-identical. No labels: the target is the dense model itself, either

``features`` (default; headless models too): every output token of the last block, each
layer-normalised without affine (so DINOv2's few huge-norm tokens and channels do not drown the
rest), plus the pooled, normalised features the head reads, relative to their norm:

    mean_tokens,channels (LN(h~) - LN(h))^2  +  mean_images ||f~ - f||^2 / ||f||^2

``logits``: T^2 KL(softmax(z_dense / T) || softmax(z_compressed / T)) [+ mse_weight * mean (z_c - z_d)^2].
Ten logits per image say little about the backbone: on the real ViT-S/14 the logit target raised
the fixed head's top-1 but lowered the feature cosine (docs/results.md).

Training images are the calibration images with a random horizontal flip as the one augmentation
(the inputs are already normalised tensors; flipping commutes with the per-channel normalisation).
With held-out images the same loss is measured on them every ``eval_every`` steps and the best
iterate is kept, the starting factors included: fine-tuning is never kept when it does not pay
on images it was not fitted on.
Before training, every pair is rebalanced so that inner channel j has equal norms in ``first``
(row j) and ``second`` (column j): a function-preserving rescaling (up to rounding) without
which Adam, whose step is about ``lr`` per element whatever the scale, would move the whitened
B (entries ~1e-3) a hundred times faster, relatively, than A (entries ~1).
The dense targets of every image and of its mirror are computed once up front (features are
stored as float16), so a step costs one forward and backward of the compressed model. Adam,
cosine learning rate to 0, seeded shuffling and flips: the same seed and thread count give
bit-identical factors. Both models stay in eval mode (no dropout / drop-path).
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
from .lowrank import balance_factors_, lowrank_layers
from .models import final_tokens, has_head, run_stage
from .refine import heldout_cosine

log = logging.getLogger(__name__)

TARGETS = ("features", "logits")
DEFAULT_TARGET = "features"


def factor_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable tensors: first/second weights of every LowRankLinear (biases excluded)."""
    out = {}
    for name, mod in lowrank_layers(model).items():
        out[f"{name}.first.weight"] = mod.first.weight
        out[f"{name}.second.weight"] = mod.second.weight
    return out


def kl_to_dense(logits: torch.Tensor, ref: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over images of T^2 KL(softmax(ref/T) || softmax(logits/T)), in nats."""
    t = temperature
    return F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(ref / t, -1), log_target=True,
                    reduction="batchmean") * t * t


def _outputs(model: nn.Module, x: torch.Tensor, target: str) -> tuple[torch.Tensor, ...]:
    """What the loss compares: (logits,) or (layer-normalised last-block tokens, pooled features)."""
    if target == "logits":
        return (model(x).float(),)
    h = final_tokens(model, x).float()
    return F.layer_norm(h, h.shape[-1:]), run_stage(model, "features", h).float()


def feature_loss(ours: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Token term + pooled-feature term of the ``features`` target (module docstring)."""
    (t, f), (t0, f0) = ours, (r.float() for r in ref)
    pooled = ((f - f0).pow(2).flatten(1).sum(1) / f0.pow(2).flatten(1).sum(1).clamp_min(1e-12)).mean()
    return F.mse_loss(t, t0) + pooled


@torch.no_grad()
def _all_outputs(model: nn.Module, x: torch.Tensor, target: str, batch_size: int, device: str,
                 dtype=torch.float32) -> tuple[torch.Tensor, ...]:
    parts = [_outputs(model, x[i:i + batch_size].to(device), target) for i in range(0, len(x), batch_size)]
    return tuple(torch.cat([p[k].to("cpu", dtype) for p in parts]) for k in range(len(parts[0])))


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, batch_size: int, device: str) -> torch.Tensor:
    return _all_outputs(model, x, "logits", batch_size, device)[0]


@torch.no_grad()
def _heldout_loss(model, x, target, ref, loss_fn, batch_size, device) -> float:
    total = 0.0
    for i in range(0, len(x), batch_size):
        out = _outputs(model, x[i:i + batch_size].to(device), target)
        total += float(loss_fn(out, tuple(r[i:i + batch_size].to(device) for r in ref))) * len(out[0])
    return total / len(x)


def _image_batches(batches: Iterable | None) -> list[torch.Tensor]:
    return [(b[0] if isinstance(b, (tuple, list)) else b).detach().cpu() for b in batches or ()]


def _cosine(dense, model, x, batch_size, device) -> dict:
    mean, low = heldout_cosine(dense, model, [x[i:i + batch_size].to(device) for i in range(0, len(x), batch_size)])
    return {"mean": mean, "min": low}


def distill_(dense: nn.Module, compressed: nn.Module, batches: Iterable, steps: int, lr: float = 1e-5,
             temperature: float = 1.0, seed: int = 0, device: str = "cpu", mse_weight: float = 0.0,
             batch_size: int | None = None, target: str = DEFAULT_TARGET, heldout: Iterable | None = None,
             eval_every: int | None = None) -> dict:
    """Fine-tune ``compressed``'s low-rank factors in place towards ``dense`` (module docstring); a summary.

    ``batches`` / ``heldout`` yield (images, labels) or images (labels are never used);
    ``batch_size`` defaults to the size of the first batch; ``eval_every`` (default steps // 10)
    spaces the held-out checks. Raises CompressError if the loss turns NaN/Inf (the factors are
    restored first) or if the model has no low-rank layers.
    """
    if target not in TARGETS:
        raise CompressError(f"unknown fine-tuning target {target!r}; use {' or '.join(TARGETS)}")
    if steps < 1:
        raise CompressError(f"fine-tuning needs steps >= 1, got {steps}")
    if not lr > 0 or not temperature > 0 or not mse_weight >= 0:
        raise CompressError(f"fine-tuning needs lr > 0, temperature > 0, mse_weight >= 0 "
                            f"(got {lr}, {temperature}, {mse_weight})")
    params = factor_parameters(compressed)
    if not params:
        raise CompressError("nothing to fine-tune: the compressed model has no low-rank layers")
    xs, xvs = _image_batches(batches), _image_batches(heldout)
    if not xs:
        raise CompressError("the fine-tuning loader yielded no images")
    bs = batch_size or len(xs[0])
    x, xv = torch.cat(xs), (torch.cat(xvs) if xvs else None)
    n = len(x)
    every = max(1, eval_every or steps // 10)
    t0 = time.perf_counter()

    if target == "logits":
        def loss_fn(out, ref):
            loss = kl_to_dense(out[0], ref[0], temperature)
            return loss + mse_weight * F.mse_loss(out[0], ref[0]) if mse_weight else loss
    else:
        loss_fn = feature_loss
    store = torch.float32 if target == "logits" else torch.float16
    dense.eval().to(device)
    compressed.eval().to(device)
    ref = _all_outputs(dense, x, target, bs, device, store)
    ref_flip = _all_outputs(dense, x.flip(-1), target, bs, device, store)   # the targets of the mirrored images
    ref_v = _all_outputs(dense, xv, target, bs, device, store) if xv is not None else None
    has_logits = target == "logits" or has_head(dense)
    if has_logits:
        logits_ref = ref[0] if target == "logits" else _logits(dense, x, bs, device)
        before = _logits(compressed, x, bs, device)

    backup = {k: p.detach().clone() for k, p in params.items()}
    balance_factors_(compressed)
    best = (_heldout_loss(compressed, xv, target, ref_v, loss_fn, bs, device), 0, None) if xv is not None else None
    heldout_before = best[0] if best else None
    cos_before = _cosine(dense, compressed, xv, bs, device) if xv is not None else None
    grad_flags = {p: p.requires_grad for p in compressed.parameters()}
    for p in compressed.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(n, generator=gen), 0
    losses, checks = [], []
    try:
        for step in tqdm(range(steps), desc=f"fine-tune (distillation, {target})", unit="step", mininterval=5,
                         disable=None):
            if pos + bs > n and pos > 0:          # a new epoch: reshuffle (the last short batch is dropped)
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos:pos + bs]
            pos += bs
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], x[idx].flip(-1), x[idx]).to(device)
            tb = tuple(torch.where(flip.view(-1, *[1] * (a.dim() - 1)), b[idx], a[idx]).to(device)
                       for a, b in zip(ref, ref_flip))
            loss = loss_fn(_outputs(compressed, xb, target), tb)
            if not torch.isfinite(loss):
                _restore_(params, backup)
                raise CompressError(f"fine-tuning diverged: the loss is {float(loss.detach())} at step {step + 1} of "
                                    f"{steps} (lr {lr:g}); the factors were restored; try a smaller "
                                    "--finetune-lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if best is not None and ((step + 1) % every == 0 or step + 1 == steps):
                val = _heldout_loss(compressed, xv, target, ref_v, loss_fn, bs, device)
                checks.append((step + 1, val))
                if val < best[0]:
                    best = (val, step + 1, {k: p.detach().clone() for k, p in params.items()})
    finally:
        for p, flag in grad_flags.items():
            p.requires_grad_(flag)
        for p in params.values():
            p.grad = None
    compressed.eval()
    if best is not None:
        _restore_(params, best[2] if best[2] is not None else backup)
        if best[2] is None:
            log.warning("fine-tuning never lowered the held-out loss (%.4g): kept the factors it started from",
                        heldout_before)
    seconds = time.perf_counter() - t0
    summary = {"target": target, "steps": steps, "lr": lr, "seed": seed, "batch_size": bs, "images": n,
               "epochs": round(steps * bs / n, 2), "augmentation": "hflip",
               "trained": "low-rank factors (first/second weights, compensation included; biases frozen)",
               "trained_params": sum(p.numel() for p in params.values()),
               "seconds": round(seconds, 3), "loss_first": losses[0], "loss_last": losses[-1]}
    if target == "logits":
        summary.update(temperature=temperature, mse_weight=mse_weight)
    if best is not None:
        summary.update(heldout_images=len(xv), heldout_loss_before=heldout_before, heldout_loss_best=best[0],
                       best_step=best[1], kept=best[2] is not None, heldout_checks=checks,
                       heldout_cosine_before=cos_before,
                       heldout_cosine_after=_cosine(dense, compressed, xv, bs, device))
    if has_logits:
        after = _logits(compressed, x, bs, device)
        kl_before, kl_after = float(kl_to_dense(before, logits_ref)), float(kl_to_dense(after, logits_ref))
        if not math.isfinite(kl_after):
            raise CompressError(f"fine-tuning produced non-finite outputs (KL {kl_after}); try a smaller --finetune-lr")
        agree = lambda y: float((y.argmax(1) == logits_ref.argmax(1)).double().mean())  # noqa: E731
        summary.update(kl_before=kl_before, kl_after=kl_after, top1_agreement_before=agree(before),
                       top1_agreement_after=agree(after))
        if target == "logits" and kl_after >= kl_before:
            log.warning("fine-tuning did not lower the KL to the dense model (%.4g -> %.4g); try another "
                        "--finetune-lr or more steps", kl_before, kl_after)
    log.info("fine-tuning (%s target): %d steps in %.1f s%s", target, steps, seconds,
             f", held-out loss {heldout_before:.4g} -> {best[0]:.4g} (step {best[1]})" if best else "")
    return summary


def _restore_(params: dict, values: dict) -> None:
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(values[k])
