"""DHEN building blocks (Zhang et al. 2022, arXiv 2203.11014): interaction modules over a token
set (B, T, D) that each return (B, T, D), and one hierarchical layer that ensembles them.

A layer is  X_{l+1} = LayerNorm(X_l + W·[M_1(X_l) ‖ … ‖ M_k(X_l)])  (concatenation along the
embedding axis, then a shared linear projection back to D per token), i.e. the paper's
"Norm(Ensemble(modules) + ShortCut(X))" with an identity shortcut since widths agree.
Stacking layers lets each module act on every other module's output of the layer below,
which is where DHEN's high-order, heterogeneous interactions come from.
"""

from __future__ import annotations

import torch
from torch import nn

from ctr_ensemble.layers.head import MLP
from ctr_ensemble.layers.interaction import CrossNetV2

MODULES = ("dot", "cross", "mlp")


class DotInteraction(nn.Module):
    """DLRM-style dot products of all token pairs i < j, projected back to tokens: (B, T, D) → (B, T, D)."""

    def __init__(self, n_tokens: int, dim: int):
        super().__init__()
        i, j = torch.triu_indices(n_tokens, n_tokens, offset=1)
        # Flat indices into the (T·T) Gram matrix: a constant Gather in ONNX, no data-dependent shapes.
        self.register_buffer("pairs", i * n_tokens + j, persistent=False)
        self.proj = nn.Linear(len(self.pairs), n_tokens * dim)
        self.n_tokens, self.dim = n_tokens, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gram = torch.matmul(x, x.transpose(1, 2)).flatten(1)  # (B, T·T)
        return self.proj(gram[:, self.pairs]).unflatten(1, (self.n_tokens, self.dim))  # (B, T, D)


class CrossInteraction(nn.Module):
    """One DCN-V2 cross step on the flattened tokens, x0 ⊙ (W x0 + b) + x0: (B, T, D) → (B, T, D)."""

    def __init__(self, n_tokens: int, dim: int, low_rank: int):
        super().__init__()
        self.cross = CrossNetV2(n_tokens * dim, 1, low_rank)
        self.shape = (n_tokens, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cross(x.flatten(1)).unflatten(1, self.shape)


class MLPInteraction(nn.Module):
    """An MLP over the flattened tokens, mapped back to token shape: (B, T, D) → (B, T, D)."""

    def __init__(self, n_tokens: int, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(MLP(n_tokens * dim, [hidden]), nn.Linear(hidden, n_tokens * dim))
        self.shape = (n_tokens, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1)).unflatten(1, self.shape)


def make_module(name: str, n_tokens: int, dim: int, low_rank: int, mlp_hidden: int) -> nn.Module:
    if name == "dot":
        return DotInteraction(n_tokens, dim)
    if name == "cross":
        return CrossInteraction(n_tokens, dim, low_rank)
    if name == "mlp":
        return MLPInteraction(n_tokens, dim, mlp_hidden)
    raise ValueError(f"unknown DHEN module {name!r}; expected one of {MODULES}")


class DHENLayer(nn.Module):
    """One hierarchical ensemble layer: (B, T, D) → (B, T, D); see the module docstring."""

    def __init__(self, modules: list[str], n_tokens: int, dim: int, low_rank: int = 0, mlp_hidden: int = 256):
        super().__init__()
        self.branches = nn.ModuleList(make_module(m, n_tokens, dim, low_rank, mlp_hidden) for m in modules)
        self.combine = nn.Linear(len(modules) * dim, dim)  # concat of k module outputs → layer width
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ens = torch.cat([m(x) for m in self.branches], dim=-1)  # (B, T, k·D)
        return self.norm(x + self.combine(ens))  # residual keeps lower-order signal; LN keeps depth stable
