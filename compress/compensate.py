"""Layer-wise error compensation (METHOD.md §4): W' = A B + G Y^T fitted against the compressed network.

For layer l with original input X and the input X~ that the already-compressed network
feeds it, G (m x q) and Y (n x q) minimise the sequential output error

    f(G, Y) = || W X - (A B + G Y^T) X~ ||_F^2 / || W X ||_F^2
            = [tr(W C W^T) - 2 tr(W D M^T) + tr(M C~ M^T)] / tr(W C W^T),  M = A B + G Y^T

with C = X X^T, D = X X~^T, C~ = X~ X~^T: only n x n Grams, no stored activations.
``fit_compensation`` (pure math) starts from the closed-form optimum of the damped
objective (reduced-rank regression: G Y^T = svd_q(K L^-T) L^-1, K = W D - A B C~,
L L^T = C~ + lambda I, i.e. the whitened SVD of the residual) and refines it with Adam on
the exact, undamped objective, keeping the best iterate (stopping early once it stalls);
so the result is never worse than the start and never worse than no compensation. In
practice the closed form is already optimal up to the damping, so Adam changes the error
negligibly and stops early; it is kept (METHOD.md §4 fits by gradient descent) because it
costs little and removes the damping bias when the damping had to grow.

``compensate_`` runs the sequential pass. The network is split into stages (embedding,
each block, the tail); stage by stage it keeps the hidden states of the calibration
images for the dense and the compressed network, collects C~ and D for the stage's
factorised layers with the earlier stages final and this stage's layers SVD-only (so X~
carries the error accumulated through the depth, METHOD.md §4), fits every layer of the
stage, then advances the compressed hidden states through the compensated stage.
Memory: two hidden-state tensors of the images used (images x tokens x width, float32);
the pipeline uses the first ``comp_images`` calibration images (default 64).
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn
from tqdm import tqdm

from .lowrank import LowRankLinear, replace_module_
from .models import run_stage, stages
from .stats import accumulate_gram
from .svd import damped_cholesky

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompInfo:
    """Sequential output errors of one layer (normalised by ||W X||^2)."""
    name: str
    comp_rank: int
    error_before: float   # A B alone, on the compressed network's inputs
    error_init: float     # closed-form start
    error_after: float    # after Adam (best iterate)
    steps: int            # Adam steps run (early stop when converged)

    def to_dict(self) -> dict:
        return {"comp_rank": self.comp_rank, "error_before": self.error_before,
                "error_init": self.error_init, "error_after": self.error_after, "steps": self.steps}


def sequential_error(W, A, B, C, Ct, D, G=None, Y=None) -> float:
    """|| W X - (A B + G Y^T) X~ ||^2 / || W X ||^2 from the Grams, float64."""
    W, C, Ct, D = W.double(), C.double(), Ct.double(), D.double()
    M = A.double() @ B.double()
    if G is not None and G.numel():
        M = M + G.double() @ Y.double().T
    return _error(float(((W @ C) * W).sum()), W @ D, M, M @ Ct)


def _error(energy: float, WD: torch.Tensor, M: torch.Tensor, MCt: torch.Tensor) -> float:
    """The normalised sequential error from its products: (tr(W C W^T) - 2 tr(W D M^T) + tr(M C~ M^T)) / energy."""
    num = energy - 2 * float((WD * M).sum()) + float((MCt * M).sum())
    return max(num, 0.0) / energy if energy > 0 else 0.0


@contextlib.contextmanager
def _one_thread():
    """Adam is a loop of skinny products (q = 8 columns): on a loaded machine, OpenMP
    synchronisation across threads costs far more than the arithmetic (measured 60x slower
    with 2 threads on a busy 2-core box), so it runs single-threaded and restores the setting.
    The closed form's square products, Cholesky and SVD keep every thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_compensation(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                     Ct: torch.Tensor, D: torch.Tensor, q: int, *, steps: int = 50, lr: float = 1e-2,
                     damping: float = 1e-4, seed: int = 0, name: str = ""
                     ) -> tuple[torch.Tensor, torch.Tensor, CompInfo]:
    """G (m x q), Y (n x q) minimising the sequential output error; see the module docstring."""
    W, A, B, C, Ct, D = (t.detach().cpu().double() for t in (W, A, B, C, Ct, D))
    m, n = W.shape
    AB = A @ B
    WD = W @ D                       # the three m x n x n products, each computed once
    ABCt = AB @ Ct
    energy = float(((W @ C) * W).sum())
    base = _error(energy, WD, AB, ABCt)   # = sequential_error(W, A, B, C, Ct, D)
    if q <= 0:
        return torch.zeros(m, 0), torch.zeros(n, 0), CompInfo(name, 0, base, base, base, 0)
    if energy <= 0:  # the layer sees no input energy: nothing to correct, keep the planned width
        return torch.zeros(m, q), torch.zeros(n, q), CompInfo(name, q, base, base, base, 0)
    P = ABCt - WD                    # f = const + [2 tr(G^T P Y) + tr(G^T G Y^T C~ Y)] / energy
    # closed form on the damped objective: whitened SVD of the residual K = -P
    L, _ = damped_cholesky(Ct, damping, name)
    K_white = torch.linalg.solve_triangular(L, (-P).T, upper=False).T   # K L^-T
    U, S, Vh = torch.linalg.svd(K_white, full_matrices=False)
    q = min(q, S.numel())
    root = S[:q].sqrt()
    G = U[:, :q] * root
    Y = torch.linalg.solve_triangular(L.T, Vh[:q].T, upper=True) * root  # L^-T V_q sqrt(S)
    if float(S[0]) <= 0:  # residual already zero: start from a tiny random point instead
        gen = torch.Generator().manual_seed(seed)
        G = 1e-6 * torch.randn(m, q, generator=gen, dtype=torch.float64)
        Y = 1e-6 * torch.randn(n, q, generator=gen, dtype=torch.float64)

    def loss(G, Y):  # the variable part of f, times energy
        return 2 * float((G * (P @ Y)).sum()) + float(((G.T @ G) * (Y.T @ Ct @ Y)).sum())

    const = base * energy
    init_err = max(const + loss(G, Y), 0.0) / energy
    best = (init_err, G.clone(), Y.clone())
    ran = 0
    if steps > 0:
        with _one_thread():
            best, ran = _adam(G, Y, P, Ct, energy, const, steps, lr, best)
    err, G, Y = best
    if err > base:  # cannot happen in exact arithmetic; never let compensation hurt
        log.warning("%s: compensation did not lower the error (%.3g -> %.3g); dropped", name, base, err)
        G, Y, err = torch.zeros_like(G), torch.zeros_like(Y), base
    return G.float(), Y.float(), CompInfo(name, q, base, init_err, err, ran)


def _adam(G, Y, P, Ct, energy, const, steps, lr, best, patience=10, tol=1e-6):
    """Adam with hand-written gradients of the Gram-form objective, cosine-decayed step size.

    Step sizes are relative to each factor's RMS, so the fit does not depend on scale. The
    objective of the current iterate falls out of the gradient's products for free. Stops
    early when ``patience`` steps lowered the best error by less than ``tol`` (relative):
    from the closed-form start that is the usual case. Returns (best, steps run).
    """
    mark = best[0]
    b1, b2, eps = 0.9, 0.999, 1e-30
    params = [G.clone(), Y.clone()]
    scales = [float(p.pow(2).mean().sqrt()) or 1.0 for p in params]
    m1 = [torch.zeros_like(p) for p in params]
    m2 = [torch.zeros_like(p) for p in params]
    for t in range(1, steps + 2):
        G, Y = params
        CtY = Ct @ Y
        PY = P @ Y
        YCY = Y.T @ CtY
        GtG = G.T @ G
        err = max(const + 2 * float((G * PY).sum()) + float((GtG * YCY).sum()), 0.0) / energy
        if err < best[0]:
            best = (err, G.clone(), Y.clone())
        if t > steps:
            break
        if t % patience == 0:
            if best[0] > mark * (1 - tol):
                return best, t - 1
            mark = best[0]
        grads = [2 * PY + 2 * G @ YCY, 2 * P.T @ G + 2 * CtY @ GtG]
        step = lr * 0.5 * (1 + math.cos(math.pi * (t - 1) / steps))
        for i, g in enumerate(grads):
            m1[i].mul_(b1).add_(g, alpha=1 - b1)
            m2[i].mul_(b2).addcmul_(g, g, value=1 - b2)
            mhat = m1[i] / (1 - b1 ** t)
            vhat = m2[i] / (1 - b2 ** t)
            params[i] = params[i] - step * scales[i] * mhat / (vhat.sqrt() + eps)
    return best, steps


@torch.no_grad()
def compensate_(dense: nn.Module, compressed: nn.Module, factors: dict[str, tuple],
                grams: dict[str, torch.Tensor] | None,
                comp_rank: int, batches: Iterable, *, steps: int = 50, lr: float = 1e-2,
                damping: float = 1e-4, device: str = "cpu", seed: int = 0,
                precision: str = "float64") -> dict[str, CompInfo]:
    """The sequential pass of METHOD.md §4 (see the module docstring); edits ``compressed`` in place.

    ``factors``: layer -> (A, B, bias) of every factorised layer, whose module in
    ``compressed`` is the SVD-only LowRankLinear; ``grams``: layer -> C = X X^T over exactly
    these ``batches`` (from the statistics pass), or None to accumulate it here as well.
    Each factorised layer is replaced by LowRankLinear.from_factors(A, B, bias, G, Y).
    """
    dense.eval().to(device)
    compressed.eval().to(device)
    names = list(factors)
    h = [(b[0] if isinstance(b, (tuple, list)) else b).to(device) for b in batches]
    h = [run_stage(dense, "embed", x) for x in h]
    ht = list(h)  # the embedding is never compressed
    infos: dict[str, CompInfo] = {}
    plan = [(s, ls) for s, ls in stages(dense, names) if s != "embed"]
    for stage, layers in tqdm(plan, desc="error compensation", unit="stage", mininterval=5, disable=None):
        if not layers:
            if stage != "tail":
                h = [run_stage(dense, stage, x) for x in h]
                ht = [run_stage(compressed, stage, x) for x in ht]
            continue
        n_of = {l: dense.get_submodule(l).in_features for l in layers}
        Ct = {l: torch.zeros(n_of[l], n_of[l], dtype=torch.float64, device=device) for l in layers}
        D = {l: torch.zeros(n_of[l], n_of[l], dtype=torch.float64, device=device) for l in layers}
        C = None if grams is not None else {
            l: torch.zeros(n_of[l], n_of[l], dtype=torch.float64, device=device) for l in layers}
        captured: dict[str, torch.Tensor] = {}

        def grab(key):
            def hook(_m, inputs):
                captured[key] = inputs[0].reshape(-1, inputs[0].shape[-1])
            return hook

        handles = [dense.get_submodule(l).register_forward_pre_hook(grab(("x", l))) for l in layers]
        handles += [compressed.get_submodule(l).register_forward_pre_hook(grab(("xt", l))) for l in layers]
        try:
            for b in range(len(h)):
                out = run_stage(dense, stage, h[b])
                run_stage(compressed, stage, ht[b])
                for l in layers:
                    x, xt = captured[("x", l)], captured[("xt", l)]
                    accumulate_gram(Ct[l], xt, precision=precision)
                    accumulate_gram(D[l], x, xt, precision=precision)
                    if C is not None:
                        accumulate_gram(C[l], x, precision=precision)
                captured.clear()
                if stage != "tail":
                    h[b] = out
        finally:
            for hd in handles:
                hd.remove()
        for l in layers:
            A, B, bias = factors[l]
            W = dense.get_submodule(l).weight.detach().cpu()   # the fit runs on the CPU in float64
            G, Y, info = fit_compensation(W, A, B, grams[l] if C is None else C[l], Ct[l], D[l], comp_rank, steps=steps, lr=lr,
                                          damping=damping, seed=seed, name=l)
            infos[l] = info
            if G.shape[1] == 0:
                continue
            mod = LowRankLinear.from_factors(A, B, bias, G, Y).to(device)
            replace_module_(compressed, l, mod)
            log.info("%s: sequential error %.4g -> %.4g (rank %d + %d)", l, info.error_before,
                     info.error_after, A.shape[1], G.shape[1])
        del Ct, D, C
        if stage != "tail":
            ht = [run_stage(compressed, stage, x) for x in ht]
    return infos
