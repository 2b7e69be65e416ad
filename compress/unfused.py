"""``nn.TransformerEncoderLayer`` rebuilt from called ``nn.Linear`` layers (the torch family's rewrite).

``nn.MultiheadAttention`` reads its fused ``in_proj_weight`` and ``out_proj.weight`` directly
(``F.multi_head_attention_forward``), so forward hooks on ``out_proj`` see no tokens and a
LowRankLinear put there is never called; in eval mode ``nn.TransformerEncoderLayer`` also takes
torch's fused fast path, which reads every weight itself. ``UnfusedEncoderLayer.from_torch``
keeps the layer's norms, MLP Linears, activation and dropouts and replaces the attention by
``UnfusedSelfAttention``: q/k/v/out projections as four Linears that the forward calls, then
``F.scaled_dot_product_attention`` as torch's own slow path does. Outputs equal the original
layer's up to float rounding (tested to 1e-5), and the rebuilt layer is not a
``TransformerEncoderLayer``, so neither the layer nor ``nn.TransformerEncoder`` takes the fast path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CompressError


class UnfusedSelfAttention(nn.Module):
    """Multi-head self-attention with ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` as nn.Linear.

    ``batch_first`` as in nn.MultiheadAttention (``nn.TransformerEncoder`` reads it). Masks are not
    supported: Vision Transformers attend over every token.
    """

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True, out_bias: bool = True,
                 dropout: float = 0.0, batch_first: bool = False):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=out_bias)

    @classmethod
    @torch.no_grad()
    def from_mha(cls, mha: nn.MultiheadAttention) -> "UnfusedSelfAttention":
        """The same attention with ``mha``'s weights split into four Linears."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise CompressError("nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported "
                                "(Vision Transformers do not use them)")
        if mha.kdim != mha.embed_dim or mha.vdim != mha.embed_dim:
            raise CompressError(f"nn.MultiheadAttention with kdim/vdim {mha.kdim}/{mha.vdim} != embed_dim "
                                f"{mha.embed_dim} is cross-attention, not a ViT block's self-attention")
        E = mha.embed_dim
        if mha._qkv_same_embed_dim:
            wq, wk, wv = mha.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
        bias = mha.in_proj_bias
        out = cls(E, mha.num_heads, bias=bias is not None, out_bias=mha.out_proj.bias is not None,
                  dropout=mha.dropout, batch_first=mha.batch_first)
        out.to(device=mha.out_proj.weight.device, dtype=mha.out_proj.weight.dtype)
        for lin, w, b in zip((out.q_proj, out.k_proj, out.v_proj), (wq, wk, wv),
                             bias.chunk(3) if bias is not None else (None,) * 3):
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        out.out_proj.weight.copy_(mha.out_proj.weight)
        if mha.out_proj.bias is not None:
            out.out_proj.bias.copy_(mha.out_proj.bias)
        return out

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or key_padding_mask is not None:
            raise ValueError("UnfusedSelfAttention takes no attention or key-padding masks")
        if not self.batch_first:
            x = x.transpose(0, 1)
        B, S, E = x.shape
        shape = (B, S, self.num_heads, E // self.num_heads)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=is_causal)
        o = self.out_proj(o.transpose(1, 2).reshape(B, S, E))
        return o if self.batch_first else o.transpose(0, 1)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


class UnfusedEncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer``'s computation (pre- or post-norm) over called Linears."""

    def __init__(self, self_attn: UnfusedSelfAttention, linear1: nn.Linear, linear2: nn.Linear,
                 norm1: nn.Module, norm2: nn.Module, activation, norm_first: bool,
                 dropout: nn.Module | None = None, dropout1: nn.Module | None = None,
                 dropout2: nn.Module | None = None):
        super().__init__()
        self.self_attn, self.linear1, self.linear2 = self_attn, linear1, linear2
        self.norm1, self.norm2, self.norm_first = norm1, norm2, norm_first
        self.activation = activation   # a module, or a function such as F.relu (as torch stores it)
        self.dropout = dropout or nn.Dropout(0.0)
        self.dropout1 = dropout1 or nn.Dropout(0.0)
        self.dropout2 = dropout2 or nn.Dropout(0.0)

    @classmethod
    def from_torch(cls, layer: nn.TransformerEncoderLayer) -> "UnfusedEncoderLayer":
        """The same layer, sharing ``layer``'s norms and MLP modules (the attention is split)."""
        return cls(UnfusedSelfAttention.from_mha(layer.self_attn), layer.linear1, layer.linear2, layer.norm1,
                   layer.norm2, layer.activation, layer.norm_first, layer.dropout, layer.dropout1, layer.dropout2)

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            x = x + self._ff(self.norm2(x))
        else:
            x = self.norm1(x + self._sa(x, src_mask, src_key_padding_mask, is_causal))
            x = self.norm2(x + self._ff(x))
        return x

    def _sa(self, x, mask, padding, is_causal):
        return self.dropout1(self.self_attn(x, mask, padding, is_causal=is_causal))

    def _ff(self, x):
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))


def unfuse_(model: nn.Module) -> int:
    """Replace every nn.TransformerEncoderLayer of ``model`` in place; returns how many."""
    todo = [n for n, m in model.named_modules() if isinstance(m, nn.TransformerEncoderLayer)]
    for name in todo:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, UnfusedEncoderLayer.from_torch(owner.get_submodule(child)))
    return len(todo)
