"""Data-parallel training with ``torchrun`` (PyTorch DDP): the few pieces every trainer needs.

``setup()`` reads the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``) and joins the process group: gloo on CPU, nccl on CUDA (one GPU per
process, ``cuda:LOCAL_RANK``). Without torchrun it returns a one-process ``Dist`` and nothing else
changes. Every collective runs under ``collective(...)``, which turns a failure (a peer process that
died: gloo sees the connection close; or one that hangs: the process-group ``timeout``) into one
``CtrError`` naming this rank and what it was doing, so a dead worker stops the job with a clear
message instead of a hang. torchrun then stops the remaining workers.

How a trainer uses it (``member.train_member`` does exactly this; the mutual-learning and
collaborative trainers plug in the same way, wrapping the one module that holds all their members):

    dist = distributed.setup(device="auto", timeout_s=300)
    module = distributed.wrap(module, dist)          # DDP: gradients all-reduced (averaged) in backward
    batches = loader.Batches(train, ..., rank=dist.rank, world=dist.world)  # this rank's rows only
    ...
    p_val = distributed.gather_rows(local_predictions, dist)  # every rank sees all, decides alike
    if dist.is_main: checkpoint.save(...)            # written once
    distributed.barrier(dist); distributed.teardown(dist)
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn

from ctr_ensemble.errors import CtrError

DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: no process group (one process)
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.backend is not None

    def tag(self) -> str:
        return f"rank {self.rank}/{self.world}" if self.active else "single process"


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto``: CUDA when torch sees a GPU, else CPU; ``cuda`` without a GPU is an error."""
    if device not in ("auto", "cpu", "cuda"):
        raise CtrError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise CtrError("--device cuda: torch sees no CUDA GPU here")
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def setup(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None) -> Dist:
    """Join the torchrun process group if this process was started by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=resolve_device(device), timeout_s=timeout_s)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    d = Dist(rank=rank, world=world, local_rank=local_rank, device=dev, backend=backend, timeout_s=timeout_s)
    if not tdist.is_initialized():
        with collective(d, "joining the process group"):
            tdist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                     device_id=dev if dev.type == "cuda" else None)
    return d


@contextlib.contextmanager
def collective(d: Dist, what: str):
    """Turn a failed or timed-out collective into a one-line CtrError naming this rank (distributed runs only)."""
    if not d.active:
        yield
        return
    try:
        yield
    except CtrError:
        raise
    except (RuntimeError, ValueError, OSError) as e:  # DistBackendError/DistNetworkError are RuntimeErrors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CtrError(f"{d.tag()}: {what} failed: another worker stopped or did not answer within "
                       f"{d.timeout_s:g}s ({type(e).__name__}: {first[:300]}); the job stops here") from e


def wrap(module: nn.Module, d: Dist) -> nn.Module:
    """DDP around ``module`` when distributed (gradients averaged over ranks in backward), else ``module``."""
    if not d.active:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Buffers (field offsets, numeric statistics) are built identically on every rank: no per-step broadcast.
    with collective(d, "wrapping the model in DDP (broadcast of rank 0's weights)"):
        return DDP(module, device_ids=[d.device.index] if d.device.type == "cuda" else None, broadcast_buffers=False)


def gather_rows(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Concatenate every rank's ``t`` (rows first; ranks may hold different row counts) in rank order."""
    if not d.active:
        return t
    with collective(d, "gathering results from every rank"):
        n = torch.tensor([t.shape[0]], device=d.device)
        counts = [torch.zeros_like(n) for _ in range(d.world)]
        tdist.all_gather(counts, n)
        m = int(max(c.item() for c in counts))
        pad = torch.zeros((m - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        parts = [torch.zeros((m, *t.shape[1:]), dtype=t.dtype, device=t.device) for _ in range(d.world)]
        tdist.all_gather(parts, torch.cat([t.to(d.device), pad]).contiguous())
        return torch.cat([p[: int(c.item())] for p, c in zip(parts, counts)])


def all_sum(values: list[float], d: Dist) -> list[float]:
    """Element-wise sum over ranks (for epoch totals)."""
    if not d.active:
        return values
    with collective(d, "summing epoch totals over ranks"):
        t = torch.tensor(values, dtype=torch.float64, device=d.device)
        tdist.all_reduce(t)
        return t.tolist()


def barrier(d: Dist, what: str = "waiting for every rank") -> None:
    if d.active:
        with collective(d, what):
            tdist.barrier()


def teardown(d: Dist) -> None:
    if d.active and tdist.is_initialized():
        tdist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S, on_start=None):
    """The torchrun process group of a training command (one plain process without torchrun), torn down at
    the end; ``on_start(dist)`` runs once it exists (the CLI keeps it so errors name the rank)."""
    d = setup(device, timeout_s=timeout_s)
    if on_start is not None:
        on_start(d)
    try:
        yield d
    finally:
        teardown(d)


def on_processes(d: Dist) -> str:
    """`` on N processes`` for a report line, empty for one process."""
    return f" on {d.world} processes" if d.world > 1 else ""


def split_range(n: int, d: Dist) -> tuple[int, int]:
    """This rank's contiguous share [start, stop) of ``n`` rows (sizes differ by at most one)."""
    return n * d.rank // d.world, n * (d.rank + 1) // d.world
