"""The processes of one run under torchrun, for train.py and predict.py alike: the start-up (NCCL
with one GPU per process, cuda:LOCAL_RANK, where the run is on CUDA; gloo otherwise), how work is
shared (rank r takes items r, r + N, ...), and how results come back together. Alone (no
WORLD_SIZE in the environment) one process does everything and every collective is a no-op.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pelvicseg.inference import resolve_device


@dataclass
class Context:
    """Where this process runs and how it talks to the others."""
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def collective_device(self) -> torch.device:
        """NCCL reduces only CUDA tensors, gloo only CPU ones."""
        return self.device if self.distributed and dist.get_backend() == "nccl" else torch.device("cpu")

    def share(self, items: Sequence) -> list:
        """This rank's items: r, r + N, ... (``gather`` puts them back in order)."""
        return list(items[self.rank::self.world_size])

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(device_ids=[self.device.index]) if self.device.type == "cuda" else dist.barrier()

    def from_main(self, compute: Callable[[], object]):
        """``compute()`` on rank 0 alone (it may print or write), its result on every rank; where it
        raises, the error on every rank, so none waits for a result that never comes."""
        if not self.distributed:
            return compute()
        value = [None]
        if self.is_main:
            try:
                value = [(True, compute())]
            except Exception as error:
                value = [(False, error)]
        dist.broadcast_object_list(value, src=0)
        succeeded, result = value[0]
        if not succeeded:
            raise result
        return result

    def raise_first(self, error: Exception | None) -> None:
        """The first rank's error on every rank when any rank met one, so all stop together (a rank
        that raised alone would leave the others waiting at the next collective)."""
        if not self.distributed:
            if error is not None:
                raise error
            return
        errors = [None] * self.world_size
        dist.all_gather_object(errors, None if error is None else error)
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed(device_name: str) -> Context:
    """Under torchrun (WORLD_SIZE set) the process group is always made, even for one process, so
    that a one-GPU run exercises every collective. NCCL only where this process runs on CUDA."""
    if "WORLD_SIZE" not in os.environ:
        return Context(resolve_device(device_name))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(device, dist.get_rank(), local_rank, dist.get_world_size(), True)


def all_reduce_sum(values: torch.Tensor, context: Context) -> torch.Tensor:
    """Sum over ranks, on the backend's device; returns a CPU tensor."""
    if not context.distributed:
        return values
    on_device = values.to(context.collective_device)
    dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
    return on_device.cpu()


def agree_to_stop(requested: bool, context: Context) -> bool:
    """True on every rank when any rank was asked to stop: all ranks then leave at the same step,
    so none waits forever in a gradient all-reduce the others have left."""
    if not context.distributed:
        return requested
    flag = torch.tensor([1.0 if requested else 0.0], device=context.collective_device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def gather_lists(items: list, context: Context) -> list:
    """Every rank's list, concatenated in rank order, on every rank."""
    if context.distributed:
        gathered = [None] * context.world_size
        dist.all_gather_object(gathered, items)
        return [x for part in gathered for x in part]
    return items


def check_replicas_identical(model: torch.nn.Module) -> str:
    """After DistributedDataParallel training every rank must hold the same weights (only rank 0's
    are saved). Each rank hashes its parameters and buffers (plus a float64 sum, readable in the
    message) and all ranks compare the gathered digests, so all raise together on a mismatch
    rather than one rank raising while the others wait at the next barrier."""
    digest = hashlib.sha256()
    total = 0.0
    for name, tensor in sorted(model.state_dict().items()):
        array = tensor.detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(array.reshape(-1).view(torch.uint8).numpy().tobytes())  # exact bytes, any dtype
        total += float(array.double().sum()) if array.is_floating_point() else 0.0
    mine = (digest.hexdigest(), total)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if any(g[0] != gathered[0][0] for g in gathered):
        raise RuntimeError("DDP check: weights differ between ranks (parameter sums "
                           + ", ".join(f"rank {r}: {g[1]:.17g}" for r, g in enumerate(gathered)) + ")")
    return f"DDP check: weights identical on {len(gathered)} ranks (parameter sum {total:.17g})"
