"""Confidence fusion of member click probabilities (reference implementation).

Negation entropy NE(p) = p·log p + (1 − p)·log(1 − p) is 0 for a certain prediction and
−log 2 at p = 0.5 (arXiv 2411.13700, "A Collaborative Ensemble Framework for CTR
Prediction"). Per sample, w = softmax(NE(p_1)/τ, …, NE(p_N)/τ) and p = Σ_i w_i·p_i.
τ → ∞ gives the mean; τ → 0 picks the most confident member (ties share equally).

This file depends on torch only: the exporter copies it next to the Triton fusion
model, so the server runs exactly this code on CPU or GPU. It also holds the
collaborative ensemble's head (below), which weights member representations the same way.
"""

from __future__ import annotations

import math

import torch
from torch import nn

MODES = ("negation_entropy", "mean")


def negation_entropy(p: torch.Tensor) -> torch.Tensor:
    """NE(p), elementwise; exact 0 at p = 0 and p = 1 (xlogy(0, 0) = 0)."""
    p = p.clamp(0.0, 1.0)
    q = 1.0 - p
    return torch.special.xlogy(p, p) + torch.special.xlogy(q, q)


def fusion_weights(probs: torch.Tensor, mode: str = "negation_entropy", tau: float = 1.0) -> torch.Tensor:
    """Member weights (B, N) for member probabilities ``probs`` (B, N); rows sum to 1."""
    if probs.dim() != 2:
        raise ValueError(f"probs must be (batch, members), got shape {tuple(probs.shape)}")
    if mode == "mean":
        return torch.full_like(probs, 1.0 / probs.shape[1])
    if mode != "negation_entropy":
        raise ValueError(f"unknown fusion mode {mode!r}; expected one of {MODES}")
    if not tau >= 0.0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    conf = negation_entropy(probs)
    if tau == 0.0:
        top = conf == conf.max(dim=1, keepdim=True).values
        return top.to(probs.dtype) / top.sum(dim=1, keepdim=True).to(probs.dtype)
    return torch.softmax(conf / tau, dim=1)


def fuse(probs: torch.Tensor, mode: str = "negation_entropy", tau: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused probability (B, 1) and weights (B, N) for member probabilities (B, N)."""
    w = fusion_weights(probs, mode, tau)
    fused = (w * probs.clamp(0.0, 1.0)).sum(dim=1, keepdim=True)
    return fused.clamp(0.0, 1.0), w


# ---------------------------------------------------------------------------------------------
# Collaborative ensemble head (CETNet, arXiv 2411.13700). Kept in this torch-only file so the
# Triton fusion model runs exactly this code; hence its own small MLP instead of layers/head.py.

HEAD_VARIANTS = ("concat", "sum")
HEAD_FORMAT = "ctr-ensemble/collab-head"
HEAD_VERSION = 1


class CollaborativeHead(nn.Module):
    """Fuses member representations h_i (B, H_i) with confidence weights w = softmax(NE(p)/τ) (B, N).

    ``concat``: logit = MLP([w_1·h_1 ‖ … ‖ w_N·h_N]), input width Σ H_i (the paper's main variant).
    ``sum``:    logit = MLP(Σ_i w_i·P_i h_i), each h_i first projected by a linear P_i to ``proj_dim``
                (members' widths differ), the paper's weighted-sum variant.
    τ is fixed, or learned as exp(log τ) when ``learn_tau`` (then τ > 0 is required).
    """

    def __init__(self, repr_dims: list[int], variant: str = "concat", hidden: list[int] = (64,), proj_dim: int = 64,
                 tau: float = 1.0, learn_tau: bool = False):
        super().__init__()
        if variant not in HEAD_VARIANTS:
            raise ValueError(f"head variant must be one of {HEAD_VARIANTS}, got {variant!r}")
        if len(repr_dims) < 2:
            raise ValueError(f"a collaborative head needs at least 2 members, got {len(repr_dims)}")
        if not tau >= 0.0 or (learn_tau and tau == 0.0):
            raise ValueError(f"tau must be > 0 (>= 0 when fixed), got {tau}")
        self.repr_dims, self.variant, self.hidden, self.proj_dim = list(repr_dims), variant, list(hidden), proj_dim
        self.learn_tau, self.tau_init = learn_tau, float(tau)
        if learn_tau:
            self.log_tau = nn.Parameter(torch.tensor(math.log(tau)))
        if variant == "sum":
            self.proj = nn.ModuleList(nn.Linear(d, proj_dim) for d in repr_dims)
            d_in = proj_dim
        else:
            d_in = sum(repr_dims)
        layers: list[nn.Module] = []
        for h in self.hidden:
            layers += [nn.Linear(d_in, h), nn.ReLU()]
            d_in = h
        layers.append(nn.Linear(d_in, 1))
        self.mlp = nn.Sequential(*layers)

    def tau(self) -> torch.Tensor | float:
        return self.log_tau.exp() if self.learn_tau else self.tau_init

    def config(self) -> dict:
        return {"repr_dims": self.repr_dims, "variant": self.variant, "hidden": self.hidden, "proj_dim": self.proj_dim,
                "tau": self.tau_init, "learn_tau": self.learn_tau}

    def forward(self, probs: torch.Tensor, reprs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused logit (B, 1) and weights (B, N) from member probabilities (B, N) and representations [(B, H_i)]."""
        w = fusion_weights(probs, "negation_entropy", self.tau())  # (B, N)
        if self.variant == "sum":
            z = sum(w[:, i : i + 1] * p(h) for i, (p, h) in enumerate(zip(self.proj, reprs)))  # (B, proj_dim)
        else:
            z = torch.cat([w[:, i : i + 1] * h for i, h in enumerate(reprs)], dim=1)  # (B, Σ H_i)
        return self.mlp(z), w


def head_payload(head: CollaborativeHead, members: list[str]) -> dict:
    """What the Triton fusion model loads from its version folder (``head.pt``): config + weights."""
    return {"format": HEAD_FORMAT, "version": HEAD_VERSION, "members": list(members), "config": head.config(),
            "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()}}


def head_from_payload(payload: dict) -> tuple[CollaborativeHead, list[str]]:
    """Inverse of ``head_payload``; raises ValueError for anything that is not a compatible head."""
    if not isinstance(payload, dict) or payload.get("format") != HEAD_FORMAT:
        raise ValueError(f"not a collaborative head (expected format {HEAD_FORMAT!r})")
    if payload.get("version") != HEAD_VERSION:
        raise ValueError(f"head version {payload.get('version')} is not supported (expected {HEAD_VERSION})")
    head = CollaborativeHead(**payload["config"])
    head.load_state_dict(payload["state_dict"])
    return head.eval(), list(payload["members"])
