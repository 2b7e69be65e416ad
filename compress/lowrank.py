"""The low-rank replacement for nn.Linear: W' = A B + G Y^T computed as two small Linears.

``first`` holds the stacked input projections [B ; Y^T] (rank + comp_rank rows) and
``second`` the stacked output projections [A , G] plus the original bias, so the forward
is (x B^T) A^T + b without ever forming the m x n product (METHOD.md §2, §4, §6). Keeping
both as plain nn.Linear keeps the model a normal timm model (state dict, export, quant).
"""
from __future__ import annotations

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """y = second(first(x)); first: n -> r+q (no bias), second: r+q -> m (with bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, comp_rank: int = 0,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        if rank < 0 or comp_rank < 0 or rank + comp_rank < 1:
            raise ValueError(f"rank {rank} + comp_rank {comp_rank} must be >= 1")
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.comp_rank = rank, comp_rank
        width = rank + comp_rank
        self.first = nn.Linear(in_features, width, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(width, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None,
                     G: torch.Tensor | None = None, Y: torch.Tensor | None = None,
                     dtype: torch.dtype = torch.float32) -> "LowRankLinear":
        """Build from A (m x r), B (r x n) and the optional compensation G (m x q), Y (n x q)."""
        (m, r), (r2, n) = A.shape, B.shape
        if r != r2:
            raise ValueError(f"A is {tuple(A.shape)} but B is {tuple(B.shape)}")
        q = 0
        if G is not None or Y is not None:
            if G is None or Y is None or G.shape[0] != m or Y.shape[0] != n or G.shape[1] != Y.shape[1]:
                raise ValueError("compensation needs G (m x q) and Y (n x q) together")
            q = G.shape[1]
        mod = cls(n, m, r, q, bias=bias is not None, dtype=dtype)
        with torch.no_grad():
            first = B if q == 0 else torch.cat([B, Y.T], dim=0)
            second = A if q == 0 else torch.cat([A, G], dim=1)
            mod.first.weight.copy_(first.to(dtype))
            mod.second.weight.copy_(second.to(dtype))
            if bias is not None:
                mod.second.bias.copy_(bias.to(dtype))
        return mod

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def dense_weight(self) -> torch.Tensor:
        """A B + G Y^T as one m x n matrix, for analysis and tests only (never in forward)."""
        return self.second.weight @ self.first.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, comp_rank={self.comp_rank}, bias={self.second.bias is not None}")


def replace_module_(model: nn.Module, qualified_name: str, module: nn.Module) -> None:
    """Swap the submodule at ``qualified_name`` (e.g. 'blocks.0.attn.qkv') in place."""
    parent_name, _, child = qualified_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not hasattr(parent, child):
        raise KeyError(f"{qualified_name} is not a submodule of {type(model).__name__}")
    setattr(parent, child, module)


def lowrank_layers(model: nn.Module) -> dict[str, LowRankLinear]:
    """Every LowRankLinear in the model, by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


@torch.no_grad()
def balance_factors_(model: nn.Module) -> None:
    """Rescale each inner channel j of every LowRankLinear so ||first[j, :]|| = ||second[:, j]||."""
    for mod in lowrank_layers(model).values():
        w1, w2 = mod.first.weight, mod.second.weight
        n1, n2 = w1.double().norm(dim=1), w2.double().norm(dim=0)
        d = torch.where((n1 > 0) & (n2 > 0), (n2 / n1.clamp_min(1e-300)).sqrt(), torch.ones_like(n1))
        w1.copy_((w1.double() * d[:, None]).to(w1.dtype))
        w2.copy_((w2.double() / d[None, :]).to(w2.dtype))
