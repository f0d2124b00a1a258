"""The same trainer on several processes: DDP (every rank holds the model) and FSDP2 (``fully_shard``:
parameters, gradients and optimizer state sharded across ranks, for models that do not fit one device).

Launch with torchrun; rank, world size and the rendezvous come from its environment:

    torchrun --nproc_per_node 2 -m lucidlm pretrain ...                        # one machine
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 \\
             --rdzv_backend c10d --rdzv_endpoint HOST:29500 -m lucidlm pretrain ...   # per node

Rank r trains on batches r, r + world, r + 2·world, ... of the data stream, so a step over W ranks
with A micro-batches each sees the same batches as one process with W·A micro-batches, and (the
loss being divided by the step's token count summed over ranks) computes the same gradient.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..model.transformer import ModelOutput, Transformer
from .checkpointing import save_checkpoint
from .trainer import Trainer


def init_distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        DistributedTrainer.owns_group = True
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


class ShardedData:
    """Every ``world``-th batch of ``data``, starting at ``rank``. Each rank reads the whole stream in
    groups of ``world`` batches and keeps its own, so after any number of batches every rank stands at
    the same data position and rank 0's state_dict resumes them all."""

    def __init__(self, data: Iterable, rank: int, world: int) -> None:
        self.data, self.rank, self.world = data, rank, world

    def __iter__(self) -> Iterator:
        stream = iter(self.data)
        while len(group := list(itertools.islice(stream, self.world))) == self.world:
            yield group[self.rank]

    @property
    def truncated(self) -> int | None:
        return getattr(self.data, "truncated", None)

    def state_dict(self) -> dict:
        return self.data.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.data.load_state_dict(state)


class DistributedTrainer(Trainer):
    """``Trainer`` over torchrun ranks. ``strategy``: "ddp" or "fsdp" (FSDP2 ``fully_shard`` per block)."""

    owns_group = False  # this module joined the process group, so it leaves it when training ends

    def __init__(self, model: nn.Module, config, train_data, val_data=None, strategy: str = "ddp", **kw) -> None:
        if strategy not in ("ddp", "fsdp"):
            raise ValueError(f"strategy must be 'ddp' or 'fsdp', got {strategy!r}")
        self.rank, self.world = init_distributed()
        if config.grad_accum < 1:
            config.validate()
        if strategy == "fsdp":
            if not isinstance(model, Transformer):
                raise ValueError("strategy 'fsdp' shards lucidlm Transformer models (block by block)")
            self.plain_config = model.config
            _fully_shard(model)
        super().__init__(model, config, ShardedData(train_data, self.rank, self.world), val_data, **kw)
        self.strategy = strategy
        self.is_main = self.rank == 0
        if strategy == "ddp" and self.world > 1:
            ddp = DDPWithOutputs if isinstance(self.model, Transformer) else DistributedDataParallel
            self.wrapped = ddp(self.model)

    def fit(self, resume: bool = True) -> dict[str, float]:
        last = super().fit(resume)
        if self.world > 1 and DistributedTrainer.owns_group and dist.is_initialized():
            dist.barrier()  # every rank done before the group goes (a rank exiting early aborts the others)
            dist.destroy_process_group()
            DistributedTrainer.owns_group = False
        return last

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
        if self.strategy == "fsdp":
            path = self._save_fsdp()
        else:
            path = super().save()
        if self.world > 1:
            dist.barrier()  # nobody runs ahead of a checkpoint that is still being written
        return path

    # --- FSDP2 checkpoints: the full (unsharded) state, written by rank 0 in the usual layout -----------
    def _save_fsdp(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=options)  # collective
        if not self.is_main:
            return None
        plain = self._plain_model(model_state)
        return save_checkpoint(self.out_dir, self.step, lambda d: self.save_weights(plain, d),
                               self.state(optimizer_state=optim_state), self.config.keep_checkpoints)

    def _plain_model(self, state: dict):
        """An unsharded Transformer holding ``state`` (on CPU), to save in the checkpoint layout."""
        with torch.device("meta"):
            plain = Transformer(self.plain_config)
        plain.load_state_dict(state, assign=True)
        plain.tie_weights()
        plain.init_buffers("cpu")
        return plain

    def _restore_model_and_optimizer(self, checkpoint, state: dict) -> None:
        if self.strategy != "fsdp":
            return super()._restore_model_and_optimizer(checkpoint, state)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        from ..checkpoint.loader import load_model

        full = load_model(checkpoint, dtype=torch.float32, device="cpu").model.state_dict()  # every rank reads it
        set_state_dict(self.model, self.optimizer, model_state_dict=full, optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))


def _fully_shard(model: nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for block in getattr(model, "blocks", []):
        fully_shard(block)
    fully_shard(model)
    register_fsdp_forward_method(model, "forward_outputs")  # unshard the root's weights for it too, as for forward


class _OutputsAsForward(nn.Module):
    """A Transformer whose forward is its ``forward_outputs``: what ``DDPWithOutputs`` wraps."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.config = model, model.config  # the objective reads the config off DDP's .module

    def forward(self, *args, **kwargs) -> ModelOutput:
        return self.model.forward_outputs(*args, **kwargs)


class DDPWithOutputs(DistributedDataParallel):
    """DDP around a Transformer, with the model's two calls: DDP syncs the gradients of what its own forward ran,
    so ``forward_outputs`` (the MoE objective's, for the aux loss) goes through that forward too."""

    def __init__(self, model: nn.Module, **kwargs) -> None:
        super().__init__(_OutputsAsForward(model), **kwargs)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.forward_outputs(*args, **kwargs).logits

    def forward_outputs(self, *args, **kwargs) -> ModelOutput:
        return super().forward(*args, **kwargs)
