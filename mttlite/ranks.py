"""Several processes (torchrun): which one this is, and joining their group.

Each stage splits its work over ranks in its own way: experts by index (i % W == r, no group
needed), distillation by (expert, t) samples whose meta-gradients are all-reduced, evaluation by
network. With one process every function here says rank 0 of 1 and the stages run as always.
"""
from __future__ import annotations

import os

import torch


def process_group() -> tuple[int, int]:
    """(rank, world size) of an initialised ``torch.distributed`` group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed(device: str) -> bool:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPUs) when WORLD_SIZE > 1; False otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return False
    torch.distributed.init_process_group("nccl" if str(device).startswith("cuda") else "gloo")
    return True
