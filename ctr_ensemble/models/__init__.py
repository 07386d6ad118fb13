"""The member registry: one explicit entry per architecture."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from ctr_ensemble.data.spec import FeatureSpec
from ctr_ensemble.errors import CtrError
from ctr_ensemble.models.base import Member, MemberConfig
from ctr_ensemble.models.dcn import DCN, DCNConfig
from ctr_ensemble.models.dcnv2 import DCNv2, DCNv2Config
from ctr_ensemble.models.deepfm import DeepFM, DeepFMConfig
from ctr_ensemble.models.dhen import DHEN, DHENConfig
from ctr_ensemble.models.emofm import EMOFM, EMOFMConfig
from ctr_ensemble.models.fibinet import FiBiNET, FiBiNETConfig
from ctr_ensemble.models.interformer import InterFormer, InterFormerConfig
from ctr_ensemble.models.lr import LR, LRConfig
from ctr_ensemble.models.pnn import PNN, PNNConfig


@dataclass(frozen=True)
class Entry:
    config: type[MemberConfig]
    model: type[Member]


REGISTRY: dict[str, Entry] = {
    "deepfm": Entry(DeepFMConfig, DeepFM),
    "dcnv2": Entry(DCNv2Config, DCNv2),
    "dcn": Entry(DCNConfig, DCN),
    "pnn": Entry(PNNConfig, PNN),
    "fibinet": Entry(FiBiNETConfig, FiBiNET),
    "dhen": Entry(DHENConfig, DHEN),
    "emofm": Entry(EMOFMConfig, EMOFM),
    "interformer": Entry(InterFormerConfig, InterFormer),
    "lr": Entry(LRConfig, LR),
}


def entry(arch: str) -> Entry:
    if arch not in REGISTRY:
        raise CtrError(f"unknown model {arch!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[arch]


def make_config(arch: str, overrides: dict | None = None) -> MemberConfig:
    """Default config of ``arch`` with ``overrides`` applied; unknown keys are an error."""
    cls = entry(arch).config
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(overrides or {}) - names
    if unknown:
        raise CtrError(f"{arch}: unknown config keys {sorted(unknown)}; valid keys: {sorted(names)}")
    return cls(**(overrides or {}))


def build(arch: str, cfg: MemberConfig, spec: FeatureSpec) -> Member:
    e = entry(arch)
    if not isinstance(cfg, e.config):
        raise CtrError(f"{arch}: expected a {e.config.__name__}, got {type(cfg).__name__}")
    model = e.model(cfg, spec)
    model.config = cfg
    if not model.xavier_init:
        return model
    # Xavier-normal weights and zero biases for every Linear (FuxiCTR's choice). Against PyTorch's
    # uniform default it lifted every classic member on the Avazu sample (+0.002..0.014 AUC, 3 seeds)
    # and did not hurt on the Criteo sample (make bench-quality); InterFormer opts out (it lost there).
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model
