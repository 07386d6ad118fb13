"""Confidence fusion of member click probabilities (reference implementation).

Negation entropy NE(p) = p·log p + (1 − p)·log(1 − p) is 0 for a certain prediction and
−log 2 at p = 0.5 (arXiv 2411.13700, "A Collaborative Ensemble Framework for CTR
Prediction"). Per sample, w = softmax(NE(p_1)/τ, …, NE(p_N)/τ) and p = Σ_i w_i·p_i.
τ → ∞ gives the mean; τ → 0 picks the most confident member (ties share equally).

This file depends on torch only: the exporter copies it next to the Triton fusion
model, so the server runs exactly this code on CPU or GPU.
"""

from __future__ import annotations

import torch

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
