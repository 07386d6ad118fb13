"""Field embeddings shared by every member: categorical ids, raw numerics and an optional
behaviour sequence → field tokens (B, F, D), and the sequence's item tokens (B, L, D)."""

from __future__ import annotations

import torch
from torch import nn

# Standardised numeric values are clipped so that an extreme but finite input
# (1e30 clicks) cannot blow up the network; ±10 std never clips real data.
NUM_CLIP = 10.0


class FeatureEmbedding(nn.Module):
    """Categorical ids (B, n_cat) int64 + raw numerics (B, n_num) float32 [+ seq_ids (B, L) int64,
    seq_len (B, 1) int64] → (B, F, D) with F = n_cat + n_num [+ 1 pooled sequence token].

    One table holds every categorical field (per-field offsets). Ids outside a field's
    vocabulary (negative, or >= its size) are mapped to the field's OOV id 0 inside the
    graph, so a served model never fails on them. A numeric field j is embedded as
    ``z_j·v_j`` (AutoInt/FiBiNET style) with z_j = standardised sign(x)·log1p(|x|),
    or as a learned "missing" vector m_j when x_j is NaN or ±Inf.

    The sequence has its own table. With ``pool_sequence`` the field tokens end with the
    mean of the valid item embeddings (FuxiCTR's default for sequence features in classic
    models), or a learned "empty history" vector when seq_len is 0. ``seq_len`` is clamped
    to [0, L] in the graph, so a wrong length never reads padding or fails.
    """

    def __init__(self, cat_sizes: list[int], num_mean: list[float], num_std: list[float], dim: int,
                 seq_size: int = 0, pool_sequence: bool = True):
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
        self.seq_size = seq_size
        self.pool_sequence = pool_sequence and seq_size > 0
        if seq_size:
            self.seq_table = nn.Embedding(seq_size, dim)
            nn.init.normal_(self.seq_table.weight, std=1e-2)
        if self.pool_sequence:
            self.seq_empty = nn.Parameter(torch.randn(dim) * 1e-2)
        self.n_fields = len(cat_sizes) + n_num + int(self.pool_sequence)
        self.dim = dim

    def forward(self, cat_ids: torch.Tensor, num: torch.Tensor, seq_ids: torch.Tensor | None = None,
                seq_len: torch.Tensor | None = None) -> torch.Tensor:
        valid = (cat_ids >= 0) & (cat_ids < self.sizes)
        ids = torch.where(valid, cat_ids, torch.zeros_like(cat_ids)) + self.offsets
        e_cat = self.table(ids)  # (B, n_cat, D)
        missing = ~torch.isfinite(num)
        x = torch.where(missing, torch.zeros_like(num), num)
        z = (torch.sign(x) * torch.log1p(torch.abs(x)) - self.num_mean) / self.num_std
        z = torch.clamp(torch.where(missing, torch.zeros_like(z), z), -NUM_CLIP, NUM_CLIP)
        e_num = z.unsqueeze(-1) * self.num_value + missing.unsqueeze(-1).to(z.dtype) * self.num_missing  # (B, n_num, D)
        if not self.pool_sequence:
            return torch.cat([e_cat, e_num], dim=1)  # (B, F, D)
        items, mask = self.sequence(seq_ids, seq_len)  # (B, L, D), (B, L)
        m = mask.unsqueeze(-1).to(items.dtype)
        count = m.sum(1)  # (B, 1)
        pooled = (items * m).sum(1) / torch.clamp(count, min=1.0)
        pooled = torch.where(count > 0, pooled, self.seq_empty)  # (B, D)
        return torch.cat([e_cat, e_num, pooled.unsqueeze(1)], dim=1)  # (B, F, D)

    def sequence(self, seq_ids: torch.Tensor, seq_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Item embeddings (B, L, D) and the validity mask (B, L) bool: position i < clamp(seq_len, 0, L)."""
        ids = torch.where((seq_ids >= 0) & (seq_ids < self.seq_size), seq_ids, torch.zeros_like(seq_ids))
        pos = torch.cumsum(torch.ones_like(seq_ids), dim=1) - 1  # (B, L): 0..L-1 without a traced L
        mask = pos < seq_len  # a seq_len above L keeps every slot, a negative one none
        return self.seq_table(ids), mask
