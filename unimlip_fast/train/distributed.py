"""One code path for every launch: `deepspeed`, `torchrun`, or a plain single process.

The launchers set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a plain process gets
a world of one whose rendezvous store listens on a port the OS assigns as it binds (no window in which
another process can take it), and it writes no launcher variable but the LOCAL_RANK DeepSpeed asks
for, so a process it starts is a plain process of its own. The backend is NCCL on CUDA and gloo on
the CPU.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistEnv:
    launched = "RANK" in os.environ
    if not launched:
        os.environ["LOCAL_RANK"] = "0"  # DeepSpeed's engine reads it from the environment
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device, backend = torch.device("cpu"), "gloo"
    import deepspeed

    if device.type == "cpu":
        # DeepSpeed's CPU shared-memory all-reduce is a C++ op compiled on first use (~2 minutes);
        # gloo does the same job here, so skip the build.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        if not launched:
            _init_world_of_one(backend)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


def _init_world_of_one(backend: str) -> None:
    """A process group of this process alone; port 0 has the OS pick the store's port as it binds."""
    store = dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True)
    dist.init_process_group(backend, store=store, rank=0, world_size=1)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """True only if ``flag`` holds on every rank (a MIN all-reduce; a host sync)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def broadcast_from_main(value):
    """Rank 0's ``value`` on every rank (a picklable object; a collective every rank must call)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value
