"""MLP towers and the prediction head."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


class MLP(nn.Sequential):
    """Linear → ReLU → Dropout, repeated: (B, d_in) → (B, hidden[-1])."""

    def __init__(self, d_in: int, hidden: Sequence[int], dropout: float = 0.0):
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(d_in, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d_in = h
        super().__init__(*layers)
        self.d_out = d_in
