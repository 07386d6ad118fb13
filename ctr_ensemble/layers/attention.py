"""Attention and gating blocks over token sets (B, T, D), written with plain matmul/softmax.

Hand-written rather than ``nn.MultiheadAttention``/``scaled_dot_product_attention`` so the
TorchScript ONNX export is a short, exact MatMul/Softmax graph with no batch-size constants:
heads are split with ``unflatten`` on the last axis only, and learned queries broadcast over
the batch through MatMul instead of being expanded to a traced batch size.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention (Vaswani et al. 2017).

    query (B|1, Tq, D), context (B, Tk, D) → (B, Tq, D). A query with batch 1 (learned
    queries) broadcasts over the context batch. ``key_mask`` (B, Tk) bool marks the context
    tokens that may be attended to (padding is False); every row needs at least one True.
    """

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} is not divisible by n_heads {n_heads}")
        self.n_heads, self.d_head = n_heads, dim // n_heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.scale = 1.0 / math.sqrt(self.d_head)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) → (B, h, T, d_h)
        return x.unflatten(-1, (self.n_heads, self.d_head)).transpose(1, 2)

    def forward(self, query: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self._heads(self.q(query)), self._heads(self.k(context)), self._heads(self.v(context))
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale  # (B, h, Tq, Tk)
        if key_mask is not None:
            # A large finite penalty rather than -inf: exact zeros after softmax, no NaN anywhere.
            scores = scores + (~key_mask).to(scores.dtype)[:, None, None, :] * -1e9
        a = torch.softmax(scores, dim=-1)
        return self.out(torch.matmul(a, v).transpose(1, 2).flatten(2))  # (B, Tq, D)


class SelfGating(nn.Module):
    """x ⊙ σ(W x + b) per token (InterFormer's self-gating summary, Zeng et al. 2024): (B, T, D) → (B, T, D).

    The gate lets each arch pass on only the parts of its summary that help the other arch.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.gate(x))


class AttentionPooling(nn.Module):
    """Pooling by multi-head attention (PMA, Lee et al. 2019; InterFormer's sequence summary):
    k learned queries attend over the tokens, (B, T, D) → (B, k, D)."""

    def __init__(self, dim: int, n_queries: int, n_heads: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, n_queries, dim) * 0.1)  # (1, k, D), broadcast over B
        self.attn = MultiHeadAttention(dim, n_heads)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.attn(self.queries, x, key_mask)


class FieldCompression(nn.Module):
    """Learned linear mix over the token axis: (B, T, D) → (B, k, D) (DHEN/InterFormer-style
    compression of many field tokens into a few)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.proj = nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.transpose(1, 2)).transpose(1, 2)


class TokenFFN(nn.Module):
    """Position-wise feed-forward D → m·D → D with ReLU: (B, T, D) → (B, T, D)."""

    def __init__(self, dim: int, mult: int = 2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, mult * dim), nn.ReLU(), nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
