"""MLP towers and the prediction head."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


class MLP(nn.Sequential):
    """Linear → [BatchNorm] → ReLU → [Dropout], repeated: (B, d_in) → (B, hidden[-1]).

    The order of FuxiCTR's ``MLP_Block`` (``batch_norm``, ``net_dropout``); in eval mode BatchNorm is a
    fixed affine map, which ONNX export folds into the graph."""

    def __init__(self, d_in: int, hidden: Sequence[int], dropout: float = 0.0, batch_norm: bool = False):
        layers: list[nn.Module] = []
        for h in hidden:
            layers.append(nn.Linear(d_in, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d_in = h
        super().__init__(*layers)
        self.d_out = d_in
