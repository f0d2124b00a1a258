"""The same trainer on several processes: DDP (every rank holds the model) and FSDP2 (``fully_shard``:
parameters, gradients and optimizer state sharded across ranks, for models that do not fit one device).

Launch with torchrun; rank, world size and the rendezvous come from its environment:

    torchrun --nproc_per_node 2 -m lucidlm.cli pretrain ...                        # one machine
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 \\
             --rdzv_backend c10d --rdzv_endpoint HOST:29500 -m lucidlm.cli pretrain ...   # per node

Rank r trains on batches r, r + world, r + 2·world, ... of the data stream, so a step over W ranks
with A micro-batches each sees the same batches as one process with W·A micro-batches, and (the
loss being divided by the step's token count summed over ranks) computes the same gradient.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .trainer import Trainer


def init_distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


class ShardedData:
    """Every ``world``-th batch of ``data``, starting at ``rank``. Each rank reads the whole stream
    (simple, and the data position is the same on every rank, so one state_dict resumes them all)."""

    def __init__(self, data: Iterable, rank: int, world: int) -> None:
        self.data, self.rank, self.world = data, rank, world

    def __iter__(self) -> Iterator:
        for i, batch in enumerate(self.data):
            if i % self.world == self.rank:
                yield batch

    def state_dict(self) -> dict:
        return self.data.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.data.load_state_dict(state)


class DistributedTrainer(Trainer):
    """``Trainer`` over torchrun ranks. ``strategy``: "ddp" or "fsdp" (FSDP2 ``fully_shard`` per block)."""

    def __init__(self, model: nn.Module, config, train_data, val_data=None, strategy: str = "ddp", **kw) -> None:
        if strategy not in ("ddp", "fsdp"):
            raise ValueError(f"strategy must be 'ddp' or 'fsdp', got {strategy!r}")
        self.rank, self.world = init_distributed()
        if config.grad_accum < 1:
            config.validate()
        if strategy == "fsdp":
            _fully_shard(model)
        super().__init__(model, config, ShardedData(train_data, self.rank, self.world), val_data, **kw)
        self.strategy = strategy
        self.is_main = self.rank == 0
        if strategy == "ddp" and self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.wrapped = DistributedDataParallel(self.model)

    def _reduce_tokens(self, tokens: int) -> int:
        return int(self._all_reduce(float(tokens)))

    def _reduce_sum(self, value: float) -> float:
        return self._all_reduce(value)

    def _sum_to_mean(self) -> float:
        return float(self.world)  # DDP and FSDP average gradients over ranks

    def _micro_batch(self, last: bool):
        if self.strategy == "ddp" and self.world > 1 and not last:
            return self.wrapped.no_sync()
        if self.strategy == "fsdp" and self.world > 1:
            self.model.set_requires_gradient_sync(last)  # reduce-scatter only after the last micro-batch
        return contextlib.nullcontext()

    def _all_reduce(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        return float(t)

    def save(self):
        path = super().save()
        if self.world > 1:
            dist.barrier()  # nobody runs ahead of a checkpoint that is still being written
        return path


def _fully_shard(model: nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in getattr(model, "blocks", []):
        fully_shard(block)
    fully_shard(model)
