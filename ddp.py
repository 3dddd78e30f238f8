"""Several processes under torchrun, shared by training (vsd.py) and the evaluation protocols
(protocol.py): the process group and this process's rank and device, DDP's gradient sync, means
and gathers over ranks, and one rank's result sent to all. Without torchrun everything here is the
single-process case.
"""
import contextlib
import os

import numpy as np
import torch
import torch.distributed as dist


def process_device():
    """(rank, world size, device) of this process. Under torchrun (RANK set) the process group is
    initialised (NCCL on GPUs, gloo on the CPU) and rank r uses cuda:LOCAL_RANK; without torchrun
    (0, 1, cuda:0 or the CPU)."""
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = ranks()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device


def ranks():
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if not dist.is_initialized():
        if "RANK" in os.environ:
            raise RuntimeError("under torchrun, call ddp.process_device() before training")
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def from_first_rank(fn, *args):
    """fn(*args) computed by rank 0 alone and sent to every rank (pickled over a gloo group: host
    memory, never a GPU's); what fn raises on rank 0 is raised on every rank, so none waits for an
    answer that never comes. One process: fn(*args). Reading a prompt file this way reads it once
    per job, not once per process (docs/training.md)."""
    rank, world = ranks()
    if world == 1:
        return fn(*args)
    box = [None]
    if rank == 0:
        try:
            box[0] = fn(*args)
        except Exception as e:  # raised again below, on every rank
            box[0] = e
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    dist.broadcast_object_list(box, src=0, group=group)
    if group is not None:
        dist.destroy_process_group(group)
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]


def no_sync(net, skip):
    """DDP's no_sync (gradients accumulate locally) when `skip`, else nothing."""
    return net.no_sync() if skip else contextlib.nullcontext()


def all_mean(x, world):
    """The mean of tensor `x` over all ranks."""
    if world > 1:
        dist.all_reduce(x)
        x = x / world
    return x


def all_gather(obj, world):
    """Every rank's `obj` in rank order (torch.distributed.all_gather_object); [obj] in one
    process."""
    if world == 1:
        return [obj]
    parts = [None] * world
    dist.all_gather_object(parts, obj)
    return parts


def interleave(parts, n):
    """Rank r's rows are items r, r + world, ...: the (n, D) array of all items in order."""
    out = np.empty((n, parts[0].shape[1]), parts[0].dtype)
    for rank, part in enumerate(parts):
        out[rank::len(parts)] = part
    return out
