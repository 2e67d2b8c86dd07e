"""Data-parallel runs under `torchrun`: which process this is, and the few collectives distillation needs.

`torchrun --nproc-per-node N -m moefy convert ...` starts N copies of the conversion. Every rank converts
the same model (seeded, deterministic, so the copies are identical) and only rank 0 publishes OUT; the
end-to-end distillation is what is shared out: each step's global batch is split over the ranks and the
gradients averaged, so N processes train the same weights one process would with the same batch (within
float reduction order). The process group is created when training starts, on the backend of the training
device (gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import os

import torch


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def join(device: str) -> None:
    """Create the process group (once) for training on `device`."""
    import torch.distributed as dist

    if world_size() > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if str(device).startswith("cuda") else "gloo")


def average_gradients(params: list[torch.Tensor]) -> None:
    """Each parameter's gradient replaced by its mean over the ranks (one flat all-reduce)."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if world_size() == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def rank0_decides(flag: bool) -> bool:
    """Rank 0's value of `flag` on every rank: a decision (stop on the clock, keep the weights) that a rank's
    own clock or rounding must not split."""
    return bool(rank0_values([float(flag)])[0])


def rank0_values(values: list[float]) -> list[float]:
    """Rank 0's `values` on every rank."""
    import torch.distributed as dist

    if world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.broadcast(tensor, src=0)
    return tensor.tolist()
