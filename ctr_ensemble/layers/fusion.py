"""Confidence fusion of member click probabilities (reference implementation), and the registry of fusion rules.

Negation entropy NE(p) = p·log p + (1 − p)·log(1 − p) is 0 for a certain prediction and
−log 2 at p = 0.5 (arXiv 2411.13700, "A Collaborative Ensemble Framework for CTR
Prediction"). Per sample, w = softmax(NE(p_1)/τ, …, NE(p_N)/τ) and p = Σ_i w_i·p_i.
τ → ∞ gives the mean; τ → 0 picks the most confident member (ties share equally).

The ``fitted`` rule adds a prior per member, w = softmax(a_i + NE(p_i)/τ), and averages in
probability space (p = Σ w_i·p_i) or logit space (p = σ(Σ w_i·logit p_i), p clamped to
[EPS, 1 − EPS] first); τ, the priors and the space are fitted on validation data
(``export --fit-fusion``, ``ctr_ensemble.export.fusion_fit``). A prior of −1e4 against 0 makes
the weight one-hot: a single member is a fitted rule too.

``RULES`` is the registry: per rule (the config's ``fusion_mode``) its parameters (names in ``PARAMS``: each a
``FusionRule`` field, a config.pbtxt parameter and a repository.json field of the same name), its weights
(the reference function) and whether its parameters are trained. ``FusionRule`` is one rule with its
parameters: ``params``/``from_params`` are the fusion model's config.pbtxt entries, ``entry``/``from_entry``
repository.json's. The exporter, the validator, the offline reference (``export.reference``), the fitter and
the served fusion model all go through it; a new rule is an entry in ``RULES`` (and, if it is trained, its fit
in ``export.fusion_fit``).

This file depends on torch only: the exporter copies it next to the Triton fusion
model, so the server runs exactly this code on CPU or GPU. It also holds the
collaborative ensemble's head (below), which weights member representations the same way.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

FITTED = "fitted"
# The collaborative ensemble's fusion mode: its trained head (below) over member probabilities and representations,
# not a rule over probabilities.
COLLABORATIVE = "collaborative"
SPACES = ("prob", "logit")
EPS = 1e-7  # logit space: p is clamped to [EPS, 1 - EPS] before the logit (float32 holds 1 - 1e-7 as 1 - 2^-23)


def negation_entropy(p: torch.Tensor) -> torch.Tensor:
    """NE(p), elementwise; exact 0 at p = 0 and p = 1 (xlogy(0, 0) = 0), with a finite gradient everywhere.

    xlogy's gradient log(p) + 1 is −inf at p = 0 (and at 1 − p = 0), and −inf · σ'(z) = −inf · 0 is NaN
    through a sigmoid: a member with |logit| ≥ 17 in float32 (sooner in bfloat16) gave NaN gradients.
    Saturated entries take NE = 0 from ``where`` instead, whose gradient there is 0 (the limit of
    dNE/dz = z·σ(z)·σ(−z)); every other entry is computed exactly as before, bit for bit."""
    p = p.clamp(0.0, 1.0)
    inside = (p > 0.0) & (p < 1.0)
    s = torch.where(inside, p, 0.5)  # never 0 or 1 inside xlogy: no inf in its backward
    q = 1.0 - s
    return torch.where(inside, torch.special.xlogy(s, s) + torch.special.xlogy(q, q), 0.0)


# --- the rules' weights: (B, N) member probabilities → (B, N) weights, rows sum to 1 ---------------------------

def _mean_weights(probs: torch.Tensor, tau, priors) -> torch.Tensor:
    return torch.full_like(probs, 1.0 / probs.shape[1])


def _negation_entropy_weights(probs: torch.Tensor, tau, priors) -> torch.Tensor:
    conf = negation_entropy(probs)
    if tau == 0.0:
        top = conf == conf.max(dim=1, keepdim=True).values
        return top.to(probs.dtype) / top.sum(dim=1, keepdim=True).to(probs.dtype)
    return torch.softmax(conf / tau, dim=1)


def _fitted_weights(probs: torch.Tensor, tau, priors) -> torch.Tensor:
    """softmax(a_i + NE(p_i)/τ); ``priors`` a sequence or a tensor (on ``probs``' device, or with a gradient)."""
    return torch.softmax(torch.as_tensor(priors, dtype=probs.dtype, device=probs.device) + negation_entropy(probs) / tau, dim=1)


# --- the registry ---------------------------------------------------------------------------------------------

def _number(name: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None


def _numbers(name: str, raw: str) -> list:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError(f"{name} must be a JSON list of numbers, got {raw!r}") from None
    if not isinstance(value, list) or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in value):
        raise ValueError(f"{name} must be a JSON list of numbers, got {raw!r}")
    return value


@dataclass(frozen=True)
class Param:
    """A rule parameter: a ``FusionRule`` field, a config.pbtxt parameter and a repository.json field."""

    default: object
    dump: Callable[[object], str]  # value → config string; parse(dump(v)) == v exactly
    parse: Callable[[str | None], object]  # config string (None: absent) → value; ValueError says what is wrong
    per_member: bool = False  # one number per member input, in ensemble order (a tuple in FusionRule)


PARAMS: dict[str, Param] = {
    "tau": Param(1.0, lambda v: repr(float(v)), lambda raw: _number("tau", raw or "1.0")),
    "priors": Param(None, lambda v: json.dumps(list(v)), lambda raw: _numbers("priors", raw or ""), per_member=True),
    "space": Param("prob", str, lambda raw: "prob" if raw is None else raw),
}


@dataclass(frozen=True)
class RuleKind:
    """One fusion rule of the registry."""

    name: str  # the config's fusion_mode
    weights: Callable  # (probs (B, N), tau, priors) → weights (B, N): the reference function
    describe: Callable[["FusionRule"], str]
    params: tuple[str, ...] = ("tau",)  # its parameters (PARAMS keys) besides fusion_mode; space: how w averages p
    tau_positive: bool = False  # τ > 0 (else τ >= 0, 0 = argmax)
    uses_tau: bool = True  # False: the config carries τ, the weights ignore it
    trained: bool = False  # its parameters are fitted on validation data (``export --fit-fusion``), no defaults


RULES: dict[str, RuleKind] = {r.name: r for r in (
    RuleKind("negation_entropy", _negation_entropy_weights, lambda r: f"{r.mode} (τ={r.tau:g})"),
    RuleKind("mean", _mean_weights, lambda r: r.mode, uses_tau=False),
    RuleKind(FITTED, _fitted_weights,
             lambda r: f"{FITTED} (τ={r.tau:.4g}, priors [{', '.join(f'{a:.4g}' for a in r.priors)}], {r.space} space)",
             params=("tau", "priors", "space"), tau_positive=True, trained=True),
)}
MODES = tuple(RULES)  # the rules over member probabilities
FUSION_MODES = (*MODES, COLLABORATIVE)  # every fusion_mode the served fusion model accepts


def _kind(mode: str) -> RuleKind:
    if mode not in RULES:
        raise ValueError(f"unknown fusion mode {mode!r}; expected one of {MODES}")
    return RULES[mode]


def _differs(name: str, value) -> bool:
    default = PARAMS[name].default
    return value is not None if default is None else value != default


def _check_params(mode: str, n: int, values: dict) -> None:
    """The space, no parameter of another rule, every per-member parameter given and one per member (n)."""
    if values.get("space", "prob") not in SPACES:
        raise ValueError(f"fusion space must be one of {SPACES}, got {values['space']!r}")
    kind = RULES.get(mode)
    if kind is None:
        return
    foreign = {p for p, v in values.items() if p not in kind.params and _differs(p, v)}
    if foreign:
        owner = next((k for k in RULES.values() if foreign <= set(k.params)), None)
        if owner is None:
            raise ValueError(f"{' and '.join(sorted(foreign))} are no parameters of the {mode!r} fusion mode")
        raise ValueError(f"{' and '.join(p for p in owner.params if p not in kind.params)} belong to the "
                         f"{owner.name!r} fusion mode, not {mode!r}")
    for p in kind.params:
        if PARAMS[p].per_member:
            if values.get(p) is None:
                raise ValueError(f"fusion mode {mode!r} needs {p} (one per member)")
            if len(values[p]) != n:
                raise ValueError(f"fusion mode {mode!r}: {len(values[p])} {p} for {n} members")


def _check_tau(kind: RuleKind, tau) -> None:
    if not (tau > 0.0 if kind.tau_positive else tau >= 0.0):
        raise ValueError(f"tau must be {'> 0' if kind.tau_positive else '>= 0'}, got {tau}")


def fusion_weights(probs: torch.Tensor, mode: str = "negation_entropy", tau: float = 1.0,
                   priors: torch.Tensor | list[float] | None = None) -> torch.Tensor:
    """Member weights (B, N) for member probabilities ``probs`` (B, N); rows sum to 1.

    ``priors`` (``fitted`` only): a_i, one per member (a sequence or a tensor on ``probs``' device)."""
    if probs.dim() != 2:
        raise ValueError(f"probs must be (batch, members), got shape {tuple(probs.shape)}")
    kind = _kind(mode)
    _check_params(mode, probs.shape[1], {"priors": priors})
    if kind.uses_tau:
        _check_tau(kind, tau)
    return kind.weights(probs, tau, priors)


def fuse(probs: torch.Tensor, mode: str = "negation_entropy", tau: float = 1.0,
         priors: torch.Tensor | list[float] | None = None, space: str = "prob") -> tuple[torch.Tensor, torch.Tensor]:
    """Fused probability (B, 1) and weights (B, N) for member probabilities (B, N).

    ``space`` (``fitted`` only): ``prob`` averages probabilities, ``logit`` averages logit(p) and
    returns the sigmoid of that."""
    _check_params(mode, probs.shape[1] if probs.dim() == 2 else 0, {"priors": priors, "space": space})
    w = fusion_weights(probs, mode, tau, priors)
    if space == "logit":
        z = torch.logit(probs.clamp(EPS, 1.0 - EPS))
        return torch.sigmoid((w * z).sum(dim=1, keepdim=True)), w
    fused = (w * probs.clamp(0.0, 1.0)).sum(dim=1, keepdim=True)
    return fused.clamp(0.0, 1.0), w


@dataclass(frozen=True)
class FusionRule:
    """One fusion rule with its parameters: what the fusion model's config.pbtxt says (``params``)."""

    mode: str = "negation_entropy"
    tau: float = 1.0
    priors: tuple[float, ...] | None = None  # fitted only, one per member in ensemble order
    space: str = "prob"  # fitted only

    def __post_init__(self):
        for p, spec in PARAMS.items():
            if spec.per_member and getattr(self, p) is not None:
                object.__setattr__(self, p, tuple(float(a) for a in getattr(self, p)))
        kind = _kind(self.mode)
        given = [getattr(self, p) for p in kind.params if PARAMS[p].per_member and getattr(self, p) is not None]
        members = len(given[0]) if given else 0  # the rule's member count is its per-member parameters' length
        _check_params(self.mode, members, {p: getattr(self, p) for p in PARAMS if p != "tau"})
        _check_tau(kind, self.tau)
        for p in kind.params:
            v = getattr(self, p)
            if PARAMS[p].per_member and not all(math.isfinite(a) for a in v):
                raise ValueError(f"{p} must be finite numbers, got {list(v)}")

    @property
    def kind(self) -> RuleKind:
        return RULES[self.mode]

    def values(self) -> dict:
        """The rule's parameters by name (its ``RuleKind.params``)."""
        return {p: getattr(self, p) for p in self.kind.params}

    def fuse(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fuse(probs, self.mode, **self.values())

    def on(self, device: torch.device) -> dict:
        """``values`` as ``fuse`` takes them, the per-member ones as a float32 tensor on ``device``: what the
        served fusion model prepares once, in ``initialize``."""
        return {p: torch.tensor(v, dtype=torch.float32, device=device) if PARAMS[p].per_member else v
                for p, v in self.values().items()}

    def params(self) -> dict[str, str]:
        """The fusion model's config parameters (strings; floats as their shortest exact repr)."""
        return {"fusion_mode": self.mode, **{p: PARAMS[p].dump(v) for p, v in self.values().items()}}

    def entry(self) -> dict:
        """repository.json's fields of the rule: its mode and parameters (per-member ones as lists)."""
        return {"mode": self.mode, **{p: list(v) if PARAMS[p].per_member else v for p, v in self.values().items()}}

    def describe(self) -> str:
        return self.kind.describe(self)

    @classmethod
    def from_entry(cls, entry: dict) -> "FusionRule":
        """``entry``'s inverse (fields of other rules are ignored)."""
        kind = _kind(entry["mode"])
        return cls(kind.name, **{p: entry[p] for p in kind.params if p in entry})

    @classmethod
    def from_params(cls, params: dict[str, str], members: int | None = None) -> "FusionRule":
        """Parse config parameters (``params``' inverse); ValueError names the parameter that is wrong.
        ``members``: the number of member inputs the per-member parameters must match."""
        kind = _kind(params.get("fusion_mode", "negation_entropy"))
        values = {}
        for p in kind.params:
            values[p] = PARAMS[p].parse(params.get(p))
            if PARAMS[p].per_member and members is not None and len(values[p]) != members:
                raise ValueError(f"{p} has {len(values[p])} entries but the model has {members} member inputs")
        return cls(kind.name, **values)


# ---------------------------------------------------------------------------------------------
# Collaborative ensemble head (CETNet, arXiv 2411.13700). Kept in this torch-only file so the
# Triton fusion model runs exactly this code; hence its own small MLP instead of layers/head.py.

HEAD_VARIANTS = ("concat", "sum")
HEAD_FORMAT = "ctr-ensemble/collab-head"
HEAD_VERSION = 1
HEAD_FILE = "head.pt"  # in the fusion model's version folder; its config names it (parameter head_file)


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
