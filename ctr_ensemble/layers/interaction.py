"""Feature-interaction blocks."""

from __future__ import annotations

import torch
from torch import nn


class FactorizationMachine(nn.Module):
    """Second-order FM interaction (Rendle 2010; DeepFM, Guo et al. 2017): (B, F, D) → (B, D).

    Uses ½((Σ_f e_f)² − Σ_f e_f²), whose sum over D is Σ_{f<g} <e_f, e_g>.
    """

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        s = e.sum(dim=1)
        return 0.5 * (s * s - (e * e).sum(dim=1))


class CrossNetV2(nn.Module):
    """DCN-V2 cross network (Wang et al. 2021): x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l; (B, d) → (B, d).

    ``low_rank`` > 0 factorises W_l = U_l V_lᵀ (the paper's mixture-free low-rank form).
    """

    def __init__(self, dim: int, n_layers: int, low_rank: int = 0):
        super().__init__()
        if low_rank > 0:
            self.layers = nn.ModuleList(
                nn.Sequential(nn.Linear(dim, low_rank, bias=False), nn.Linear(low_rank, dim)) for _ in range(n_layers)
            )
        else:
            self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x
