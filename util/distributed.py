"""torch.distributed, switched on by torchrun's environment (RANK, WORLD_SIZE), off otherwise.

    torchrun --nproc_per_node N main_pretrain.py ...                       # one machine
    torchrun --nnodes M --nproc_per_node N --rdzv_backend c10d \
        --rdzv_endpoint HOST:PORT --rdzv_id JOB main_pretrain.py ...       # M machines (docs/MULTINODE.md)

torchrun sets, for every worker: RANK and WORLD_SIZE (global: over all machines), LOCAL_RANK
(the worker's index on its machine: its GPU), LOCAL_WORLD_SIZE, and MASTER_ADDR/MASTER_PORT of
the store the process group meets at (with c10d, the one the rendezvous chose). The process group
is created from those (init_method env://), so single- and multi-machine runs take the same path.
NCCL on CUDA, gloo on CPU. Only global rank 0 writes files and prints (other ranks' stdout goes
to /dev/null; errors still reach stderr).
"""
import os
import sys

import torch
import torch.distributed as dist

from util.errors import UserError


def init_distributed(device: torch.device) -> torch.device:
    """Join the process group if launched by torchrun; returns this rank's device
    (cuda:LOCAL_RANK on CUDA: the device index counts on this machine, the rank over all)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        local = local_rank()
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} CUDA "
                            f"device(s): --nproc_per_node must not exceed the GPUs of a machine")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    print(f"distributed: {dist.get_world_size()} processes ({dist.get_backend()}), "
          f"{local_world} on this machine; global rank 0 writes")
    return device


def local_rank() -> int:
    """This worker's index on its machine (torchrun's LOCAL_RANK; 0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def mean_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (identity in a single process)."""
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True if `flag` is True on any rank (a collective: call it on every rank at the same step)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_equal(value: torch.Tensor) -> bool:
    """True if a scalar tensor is bitwise the same on every rank (a collective)."""
    if not dist.is_initialized():
        return True
    gathered = [torch.zeros_like(value) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, value)
    return all(torch.equal(g, gathered[0]) for g in gathered)
