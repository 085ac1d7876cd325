"""torch.distributed set-up for learners: gloo on CPU, NCCL on GPU, same code.

DeepSpeed reads DS_ACCELERATOR when it is first imported, so this module (imported before
deepspeed anywhere in rayalign) is the one place that sets it.
"""

from __future__ import annotations

import os
import socket

import torch

if "DS_ACCELERATOR" not in os.environ:
    os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"

import deepspeed
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def resolve_backend(backend: str = "auto") -> str:
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("learner.backend 'nccl' needs CUDA GPUs; use 'gloo' (or 'auto') on CPU")
    return backend


def init_process_group(backend: str = "auto", rank: int | None = None, world_size: int | None = None,
                       master_addr: str | None = None, master_port: int | None = None) -> None:
    """Join (or create) the default process group. Without arguments and without the usual
    RANK/WORLD_SIZE/MASTER_* variables, a one-rank group on loopback is created."""
    if dist.is_initialized():
        return
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world_size)
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ["MASTER_ADDR"] = master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
    own_port = not (master_port or os.environ.get("MASTER_PORT"))
    os.environ["MASTER_PORT"] = str(master_port or os.environ.get("MASTER_PORT") or free_port())
    deepspeed.init_distributed(dist_backend=resolve_backend(backend), auto_mpi_discovery=False,
                               rank=rank, world_size=world_size)
    if own_port:
        # The port is this process's store now: a child process (a CLI run started from here) must
        # not inherit it as its own rendezvous, or it fails with EADDRINUSE.
        del os.environ["MASTER_PORT"]


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
