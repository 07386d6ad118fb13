"""Field embeddings shared by every member: categorical ids and raw numerics → (B, F, D)."""

from __future__ import annotations

import torch
from torch import nn

# Standardised numeric values are clipped so that an extreme but finite input
# (1e30 clicks) cannot blow up the network; ±10 std never clips real data.
NUM_CLIP = 10.0


class FeatureEmbedding(nn.Module):
    """Categorical ids (B, n_cat) int64 + raw numerics (B, n_num) float32 → (B, n_cat + n_num, D).

    One table holds every categorical field (per-field offsets). Ids outside a field's
    vocabulary (negative, or >= its size) are mapped to the field's OOV id 0 inside the
    graph, so a served model never fails on them. A numeric field j is embedded as
    ``z_j·v_j`` (AutoInt/FiBiNET style) with z_j = standardised sign(x)·log1p(|x|),
    or as a learned "missing" vector m_j when x_j is NaN or ±Inf.
    """

    def __init__(self, cat_sizes: list[int], num_mean: list[float], num_std: list[float], dim: int):
        super().__init__()
        sizes = torch.tensor(cat_sizes, dtype=torch.int64)
        self.register_buffer("sizes", sizes, persistent=False)
        self.register_buffer("offsets", torch.cumsum(sizes, 0) - sizes, persistent=False)
        self.register_buffer("num_mean", torch.tensor(num_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("num_std", torch.tensor(num_std, dtype=torch.float32), persistent=False)
        self.table = nn.Embedding(int(sizes.sum()), dim)
        nn.init.normal_(self.table.weight, std=1e-2)
        n_num = len(num_mean)
        self.num_value = nn.Parameter(torch.randn(n_num, dim) * 1e-2)
        self.num_missing = nn.Parameter(torch.randn(n_num, dim) * 1e-2)
        self.n_fields = len(cat_sizes) + n_num
        self.dim = dim

    def forward(self, cat_ids: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        valid = (cat_ids >= 0) & (cat_ids < self.sizes)
        ids = torch.where(valid, cat_ids, torch.zeros_like(cat_ids)) + self.offsets
        e_cat = self.table(ids)  # (B, n_cat, D)
        missing = ~torch.isfinite(num)
        x = torch.where(missing, torch.zeros_like(num), num)
        z = (torch.sign(x) * torch.log1p(torch.abs(x)) - self.num_mean) / self.num_std
        z = torch.clamp(torch.where(missing, torch.zeros_like(z), z), -NUM_CLIP, NUM_CLIP)
        e_num = z.unsqueeze(-1) * self.num_value + missing.unsqueeze(-1).to(z.dtype) * self.num_missing  # (B, n_num, D)
        return torch.cat([e_cat, e_num], dim=1)  # (B, F, D)
