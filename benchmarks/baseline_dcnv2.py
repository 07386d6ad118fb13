"""The plain-PyTorch DCNv2 baseline of issue 7, on purpose free of this package.

26 categorical fields × 100,000 ids × embedding 16 in one table, a full-rank cross network of 3 layers
(x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l) in parallel with an MLP 400-400-400, a linear head on both,
BCE, dense Adam over every parameter, random ids and labels already in memory (on the device).
``run`` times optimiser steps after a warm-up and returns samples/s.
"""

from __future__ import annotations

import time

import torch
from torch import nn


class PlainDCNv2(nn.Module):
    def __init__(self, fields: int = 26, ids: int = 100_000, dim: int = 16, cross: int = 3, hidden=(400, 400, 400)):
        super().__init__()
        self.emb = nn.Embedding(fields * ids, dim)
        self.register_buffer("offsets", torch.arange(fields) * ids)
        d = fields * dim
        self.cross = nn.ModuleList(nn.Linear(d, d) for _ in range(cross))
        layers, width = [], d
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.mlp = nn.Sequential(*layers)
        self.head = nn.Linear(d + width, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x0 = self.emb(ids + self.offsets).flatten(1)  # (B, F·D)
        x = x0
        for lin in self.cross:
            x = x0 * lin(x) + x
        return self.head(torch.cat([x, self.mlp(x0)], 1))[:, 0]


def run(batch: int, seconds: float = 20.0, max_steps: int = 60, device: str = "cpu", fields: int = 26,
        ids: int = 100_000, hidden=(400, 400, 400)) -> dict:
    dev = torch.device(device)
    torch.manual_seed(0)
    model = PlainDCNv2(fields, ids, hidden=tuple(hidden)).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    n_batches = 8
    x = torch.randint(0, ids, (n_batches, batch, fields), device=dev)
    y = torch.randint(0, 2, (n_batches, batch), device=dev).float()

    def step(i: int) -> None:
        loss = loss_fn(model(x[i % n_batches]), y[i % n_batches])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(3):
        step(i)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    while n < max_steps and time.perf_counter() - t0 < seconds:
        step(n)
        n += 1
    if dev.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"steps": n, "samples_per_s": n * batch / wall, "samples_per_cpu_s": n * batch / cpu,
            "params": sum(p.numel() for p in model.parameters())}
