"""Activation-aware low-rank factorisation of one weight matrix (METHOD.md §1-§2). Pure math.

Every variant has the same shape: pick an invertible n x n matrix M, take one SVD
``W M = U S V^T`` and truncate it, giving ``W' = A B`` with ``A = U_r S_r`` (m x r) and
``B = V_r^T M^-1`` (r x n). The variants differ only in M:

* ``plain``: M = I, i.e. the SVD of W (minimises ||W - W'||_F; baseline).
* ``diag``: M = diag(mean|x|^alpha), ASVD-style per-input-channel scaling (alpha 0.5).
* ``whiten`` (default): M = L with L L^T = C + lambda I (Cholesky of the damped Gram).
  Truncating ``W L`` minimises tr(E (C + lambda I) E^T), so for lambda -> 0 it is the exact
  optimum of the output error: the principal term of METHOD.md §2.
* ``mean-input``: M = diag(|x_bar|), x_bar the mean input vector over all calibration
  tokens: the "representative mean input" reading of the paper, weighting each weight
  column by the magnitude of its average input (channels whose mean is near zero are
  floored at 1% of the mean magnitude, so M stays invertible).

For all variants the error curve is evaluated on the SAME objective, the true output
error under the undamped Gram C (METHOD.md §1):

    e(r) = tr(E_r C E_r^T) / tr(W C W^T) = sum_{i>r} s_i^2 (b_i C b_i^T) / tr(W C W^T)

where b_i are the rows of V^T M^-1 (the cross terms vanish because the u_i are
orthonormal). Each term is >= 0, so every curve is non-increasing; it reaches 0 at full
rank. One SVD per layer gives the factors for any rank and the whole curve.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .errors import CompressError

log = logging.getLogger(__name__)

METHODS = ("whiten", "plain", "diag", "mean-input")
DEFAULT_DAMPING = 1e-4   # lambda relative to the mean diagonal of C
MAX_DAMPING = 1.0


@dataclass(frozen=True)
class Factorization:
    """Factors for any rank up to ``max_rank`` and the full error curve of one layer."""
    method: str
    left: torch.Tensor      # m x k: U_k S_k
    right: torch.Tensor     # k x n: V_k^T M^-1
    sigma: torch.Tensor     # all min(m, n) singular values of W M
    curve: torch.Tensor     # e(r) for r = 0 .. min(m, n), float64
    damping: float          # absolute lambda added to C (whiten), 0 otherwise
    energy: float           # tr(W C W^T)

    @property
    def max_rank(self) -> int:
        return self.left.shape[1]

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with A @ B the rank-``rank`` approximation of W."""
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"rank {rank} outside 1..{self.max_rank}")
        return self.left[:, :rank], self.right[:rank]

    def error(self, rank: int) -> float:
        return float(self.curve[rank])


def output_error(W: torch.Tensor, W_approx: torch.Tensor, C: torch.Tensor) -> float:
    """tr(E C E^T) / tr(W C W^T) with E = W - W_approx, in float64 (METHOD.md §1)."""
    W64, C64 = W.double(), C.double()
    E = W64 - W_approx.double()
    den = float(((W64 @ C64) * W64).sum())
    return float(((E @ C64) * E).sum()) / den if den > 0 else 0.0


def damped_cholesky(C: torch.Tensor, damping: float = DEFAULT_DAMPING, name: str = "") -> tuple[torch.Tensor, float]:
    """Lower L with L L^T = C + lambda I; lambda = damping * mean(diag C), grown x10 until it works.

    Returns (L, absolute lambda). Growing is logged; a Gram that cannot be factorised even
    at lambda = mean(diag C) raises CompressError (it would mean non-finite statistics).
    """
    C = C.double()
    n = C.shape[0]
    scale = float(C.diagonal().mean())
    if not torch.isfinite(C).all():
        raise CompressError(f"non-finite Gram matrix{' for ' + name if name else ''}")
    if scale <= 0:
        scale = 1.0
    rel = damping if damping > 0 else 0.0
    eye = torch.eye(n, dtype=torch.float64, device=C.device)
    while True:
        lam = rel * scale
        L, info = torch.linalg.cholesky_ex(C + lam * eye)
        if int(info) == 0 and torch.isfinite(L).all():
            if rel > damping:
                log.warning("%s: Gram matrix is (near) singular; damping grown to %.1e x mean diagonal",
                            name or "layer", rel)
            return L, lam
        rel = max(rel * 10, 1e-10)
        if rel > MAX_DAMPING:
            raise CompressError(f"cannot factorise the Gram matrix{' of ' + name if name else ''} "
                                f"even with damping {MAX_DAMPING} x mean diagonal")


def factorise(W: torch.Tensor, C: torch.Tensor, method: str = "whiten", *,
              mean_abs: torch.Tensor | None = None, mean_input: torch.Tensor | None = None,
              alpha: float = 0.5, damping: float = DEFAULT_DAMPING, keep: int | None = None,
              name: str = "") -> Factorization:
    """Factorise W (m x n) against the input Gram C (n x n); keep factors up to rank ``keep``.

    ``mean_abs`` (diag) and ``mean_input`` (mean-input) are the per-channel statistics the
    diagonal variants need. All arithmetic is float64; the factors are returned float32.
    """
    if method not in METHODS:
        raise CompressError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    W64, C64 = W.detach().double(), C.detach().double()
    m, n = W64.shape
    if C64.shape != (n, n):
        raise ValueError(f"Gram is {tuple(C64.shape)} but W has {n} inputs")
    if not torch.isfinite(W64).all():
        raise CompressError(f"non-finite weights{' in ' + name if name else ''}")
    full = min(m, n)
    keep = full if keep is None else max(1, min(keep, full))
    energy = float(((W64 @ C64) * W64).sum())
    lam = 0.0
    if energy <= 0:  # inputs are all zero: any factorisation gives zero output error
        log.warning("%s: zero input energy on the calibration set; using plain SVD", name or "layer")
        M = None
    elif method == "whiten":
        L, lam = damped_cholesky(C64, damping, name)
        M = L
    else:
        if method == "plain":
            s = None
        elif method == "diag":
            if mean_abs is None:
                raise ValueError("diag needs mean_abs")
            s = mean_abs.double().clamp_min(0) ** alpha
            s = s.clamp_min(1e-6 * float(s.max()) if float(s.max()) > 0 else 1.0)
        else:
            if mean_input is None:
                raise ValueError("mean-input needs mean_input")
            s = mean_input.double().abs()
            s = s.clamp_min(0.01 * float(s.mean()) if float(s.mean()) > 0 else 1.0)
        M = s  # a diagonal M is applied as a column scaling
    if M is None:
        WM = W64
    elif M.dim() == 1:
        WM = W64 * M
    else:
        WM = W64 @ M
    U, S, Vh = torch.linalg.svd(WM, full_matrices=False)
    if M is not None and M.dim() == 2:                               # B = V^T L^-1, by substitution
        B_all = torch.linalg.solve_triangular(M.T, Vh.T, upper=True).T
    elif M is not None and M.dim() == 1:
        B_all = Vh / M
    else:
        B_all = Vh
    c = ((B_all @ C64) * B_all).sum(1).clamp_min(0)                  # b_i C b_i^T >= 0
    tail = torch.flip(torch.cumsum(torch.flip(S**2 * c, [0]), 0), [0])  # sum_{i>=r}
    curve = torch.zeros(full + 1, dtype=torch.float64)
    if energy > 0:
        curve[:full] = tail / energy
    if not torch.isfinite(curve).all() or not torch.isfinite(B_all).all():
        raise CompressError(f"factorisation of {name or 'layer'} produced non-finite values")
    curve = torch.cummin(curve, 0).values     # monotone in exact arithmetic; guard against rounding
    left = (U[:, :keep] * S[:keep]).float()
    right = B_all[:keep].float()
    return Factorization(method, left, right, S, curve, lam, energy)
