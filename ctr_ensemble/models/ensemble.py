"""The collaborative ensemble's inference side: members + head (``CollaborativeModel``), its checkpoint and
offline scoring (``predict_collab``). Training is ``training.collab``.

Each member gives a representation h_i (B, H_i) and a probability p_i; the head
(``layers.fusion.CollaborativeHead``) weights them per sample with w = softmax(NE(p)/τ) and predicts from
[w_1·h_1 ‖ … ‖ w_N·h_N] (or a weighted sum).

A collaborative checkpoint (``collab.pt`` + ``.sha256``) holds the member checkpoints (each the ordinary
member payload, ``models.checkpoint``), the head's config and weights, and the training config; export
turns it into ONNX members + a ``collaborative`` fusion model with the head in ``head.pt``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ctr_ensemble.data.spec import FeatureSpec, feed_rows
from ctr_ensemble.errors import CtrError
from ctr_ensemble.layers.fusion import CollaborativeHead, head_payload
from ctr_ensemble.models import checkpoint
from ctr_ensemble.models.base import Member
from ctr_ensemble.models.checkpoint import Checkpoint

COLLAB_FORMAT = "ctr-ensemble/collab-checkpoint"
COLLAB_VERSION = 1


class CollaborativeModel(nn.Module):
    """Members + head. ``forward`` gives fused prob (B, 1), weights (B, N) and member probs (B, N)."""

    def __init__(self, members: list[Member], head: CollaborativeHead, freeze_members: bool = False,
                 detach_head: bool = False):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.head = head
        self.freeze_members, self.detach_head = freeze_members, detach_head
        if freeze_members:
            self.members.requires_grad_(False)

    def train(self, mode: bool = True) -> "CollaborativeModel":
        """Frozen members stay in eval mode (no dropout, BatchNorm statistics kept): the head trains on what they serve."""
        super().train(mode)
        if self.freeze_members:
            self.members.eval()
        return self

    def logits(self, cat_ids: torch.Tensor, num: torch.Tensor, seq_ids: torch.Tensor | None = None,
               seq_len: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fused logit (B, 1), member logits (B, N), weights (B, N)."""
        outs = [m.logits(cat_ids, num, seq_ids, seq_len) for m in self.members]
        member_logits = torch.cat([z for z, _ in outs], dim=1)  # (B, N)
        probs, reprs = torch.sigmoid(member_logits), [h for _, h in outs]
        if self.detach_head:  # same values; only the head's gradient stops at its inputs
            probs, reprs = probs.detach(), [h.detach() for h in reprs]
        fused, w = self.head(probs, reprs)
        return fused, member_logits, w

    def forward(self, cat_ids: torch.Tensor, num: torch.Tensor | None = None, seq_ids: torch.Tensor | None = None,
                seq_len: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if num is None:  # data without numeric fields, as in Member.forward
            num = cat_ids[:, :0].to(torch.float32)
        fused, member_logits, w = self.logits(cat_ids, num, seq_ids, seq_len)
        return torch.sigmoid(fused), w, torch.sigmoid(member_logits)


@dataclass
class CollabCheckpoint:
    members: list[Checkpoint]
    head_config: dict
    head_state: dict[str, torch.Tensor]
    train_config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    source: str | None = None

    @property
    def spec(self) -> FeatureSpec:
        return self.members[0].spec

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    def build(self) -> CollaborativeModel:
        """The collaborative model with these weights, in eval mode."""
        head = CollaborativeHead(**self.head_config)
        try:
            head.load_state_dict(self.head_state)
        except RuntimeError as e:
            raise CtrError(f"{self.source}: head weights do not fit its config: {str(e).splitlines()[0]}") from e
        return CollaborativeModel([m.build() for m in self.members], head).eval()

    def head_payload(self) -> dict:
        """The head as the Triton fusion model loads it (see ``layers.fusion.head_payload``)."""
        return head_payload(self.build().head, self.names)


def save(ck: CollabCheckpoint, path: str | Path) -> Path:
    return checkpoint.write_verified(path, {
        "format": COLLAB_FORMAT, "version": COLLAB_VERSION,
        "members": [checkpoint.payload(m) for m in ck.members],
        "head": {"config": ck.head_config, "state_dict": {k: v.detach().cpu() for k, v in ck.head_state.items()}},
        "train_config": ck.train_config, "metrics": ck.metrics,
    })


def load(path: str | Path) -> CollabCheckpoint:
    path = Path(path)
    obj = checkpoint.read_verified(path, "collaborative checkpoint", COLLAB_FORMAT, COLLAB_VERSION)
    src = str(path.resolve())
    try:
        members = [checkpoint.from_payload(m, f"{src}#{m.get('name')}") for m in obj["members"]]
        return CollabCheckpoint(members, obj["head"]["config"], obj["head"]["state_dict"], obj.get("train_config", {}),
                                obj.get("metrics", {}), source=src)
    except (KeyError, TypeError) as e:
        raise CtrError(f"{path}: collaborative checkpoint lacks {e}") from e


@torch.no_grad()
def predict_collab(model: CollaborativeModel, feeds: dict[str, np.ndarray],
                   batch_size: int = 16384) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fused probabilities (N,), weights (N, M) and member probabilities (N, M), float32, eval mode;
    ``feeds`` as ``Arrays.feeds()``."""
    model.eval()
    parts = [model(**{k: torch.from_numpy(v[s : s + batch_size]) for k, v in feeds.items()})
             for s in range(0, feed_rows(feeds), batch_size)]
    if not parts:
        m = len(model.members)
        return np.zeros(0, np.float32), np.zeros((0, m), np.float32), np.zeros((0, m), np.float32)
    fused, w, member_p = (torch.cat([p[k] for p in parts]).numpy() for k in range(3))
    return fused[:, 0], w, member_p
