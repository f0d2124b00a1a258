"""The trainer: the optimisation loop shared by pretraining, SFT, LoRA, DPO and the encoder–decoder.

One optimizer step:
    grad_accum micro-batches ─▶ objective (loss sum, token count) ─▶ backward of sum / step tokens
    ─▶ spike guard (skip, or roll back to the last checkpoint with a lower LR) ─▶ clip ─▶ AdamW ─▶ schedule
Every ``eval_every`` steps: validation loss and perplexity; every ``save_every``: an atomic checkpoint
(see ``checkpointing.py``) from which ``fit`` resumes exactly — same batches, RNG streams and
optimizer state, so a run killed with SIGKILL and resumed ends at the loss of an uninterrupted one.
Metrics go to ``metrics.jsonl`` and ``loss_curve.png`` in ``out_dir``.

Datasets are iterables of batch dicts (``input_ids``, ``labels``, ``attention_mask``, ...); the
training one must offer ``state_dict()`` / ``load_state_dict()`` for the data position.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..device import resolve_device
from ..model.quantize import require_float
from .checkpointing import (
    checkpoint_root,
    ensure_writable_dir,
    latest_checkpoint,
    load_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config_file import opt
from .metrics import MetricsLog, plot_loss_curve
from .objectives import CausalLM, LossParts, count_tokens
from .optim import build_optimizer, warmup_cosine
from .spike_guard import SpikeGuard, Verdict
from .state_io import encode

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    out_dir: str = opt("runs/train", "directory for checkpoints, metrics.jsonl and loss_curve.png")
    max_steps: int = opt(1000, "optimizer steps to train for")
    lr: float = opt(3e-4, "peak learning rate")
    min_lr_ratio: float = opt(0.1, "the cosine schedule ends at lr × min_lr_ratio")
    warmup_steps: int = opt(100, "steps of linear warmup")
    weight_decay: float = opt(0.1, "AdamW weight decay, on >= 2-D weights only")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    clip_grad_norm: float | None = opt(1.0, "clip the gradient norm to this (none: no clipping)")
    precision: str = opt("fp32", "fp32, bf16 (autocast) or fp16 (autocast + loss scaling, CUDA only)")
    aux_loss_weight: float = opt(0.01, "weight of the MoE load-balancing loss")
    eval_every: int = opt(100, "steps between validation runs")
    eval_batches: int = opt(20, "validation batches per run")
    save_every: int = opt(100, "steps between checkpoints")
    keep_checkpoints: int = opt(2, "checkpoints kept (older ones are deleted)")
    log_every: int = opt(1, "steps between metrics.jsonl lines")
    spike_factor: float = opt(3.0, "a step whose loss exceeds factor × the running mean is skipped")
    spike_window: int = opt(20, "steps in the running mean of the spike guard")
    max_spikes: int = opt(3, "spikes in a row before rolling back to the last checkpoint")
    rollback_lr_factor: float = opt(0.5, "learning-rate multiplier applied at each rollback")
    seed: int = opt(0, "seed of the run's random number generators")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    progress: bool | None = opt(None, "draw a progress bar (default: when stderr is a terminal)")

    def validate(self) -> None:
        problems = []
        for name in ("max_steps", "grad_accum", "eval_every", "save_every", "log_every", "eval_batches"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.lr <= 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {PRECISIONS} (got {self.precision!r})")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            problems.append(f"clip_grad_norm must be > 0 or None (got {self.clip_grad_norm})")
        if not 0 < self.rollback_lr_factor <= 1:
            problems.append(f"rollback_lr_factor must be in (0, 1] (got {self.rollback_lr_factor})")
        if problems:
            raise ValueError("bad training config: " + "; ".join(problems))

    # fields that may change between a run and its resume without changing what is computed
    RESUMABLE_CHANGES = ("max_steps", "eval_every", "save_every", "keep_checkpoints", "log_every", "progress",
                         "device", "out_dir", "eval_batches")


# objective(model, batch) -> LossParts; an optional ``count(batch)`` says what a step averages over
# (default: trained tokens; DPO: pairs)
Objective = Callable[[nn.Module, dict[str, torch.Tensor]], LossParts]


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_data: Iterable[dict[str, torch.Tensor]],
        val_data: Iterable[dict[str, torch.Tensor]] | None = None,
        objective: Objective | None = None,
        save_weights: Callable[[nn.Module, Path], None] | None = None,
        load_weights: Callable[[nn.Module, Path], None] | None = None,
        run_info: dict[str, Any] | None = None,
    ) -> None:
        """save_weights/load_weights: how a checkpoint stores the model (default: ``default_save_weights``).
        run_info: what defines the run beyond TrainConfig (model config, data files...); a resume
        with different values is refused."""
        config.validate()
        require_float(model, "training")  # integer weights have no gradient: named before any step
        self.config = config
        self.device = torch.device(resolve_device(config.device))
        if config.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("fp16 training needs CUDA (loss scaling); use precision='bf16' on CPU")
        self.model = model.to(self.device)
        self.wrapped: nn.Module = self.model  # what the objective calls (DistributedTrainer: the DDP wrapper)
        self.is_main = True  # writes logs and checkpoints (rank 0 of a distributed run)
        self.train_data, self.val_data = train_data, val_data
        self.objective = objective or CausalLM(config.aux_loss_weight)
        self.save_weights = save_weights or default_save_weights
        self.load_weights = load_weights or default_load_weights
        self.run_info = {**(run_info or {}), "train": _defining_fields(config)}
        encode(self.run_info, {}, "run_info")  # an unstorable value fails now, not at the first checkpoint
        self.out_dir = Path(config.out_dir)
        self.optimizer = build_optimizer(model, config.lr, config.weight_decay, (config.beta1, config.beta2))
        self.schedule = warmup_cosine(config.warmup_steps, config.max_steps, config.min_lr_ratio)
        self.guard = SpikeGuard(config.spike_factor, config.spike_window, config.max_spikes)
        self.scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
        self.step = 0  # optimizer steps taken (skipped steps count: their data is consumed)
        self.lr_scale = 1.0  # lowered by rollbacks
        self.tokens_seen = 0
        self.skipped = 0
        self._train_iter: Iterator | None = None

    # --- the loop -----------------------------------------------------------------------------
    def fit(self, resume: bool = True) -> dict[str, float]:
        """Train to ``max_steps``, resuming from ``out_dir``'s latest checkpoint when there is one."""
        if self.is_main:  # a read-only out_dir fails here, not at the first checkpoint
            ensure_writable_dir(checkpoint_root(self.out_dir), "checkpoint directory")
        checkpoint = latest_checkpoint(self.out_dir) if resume else None
        if checkpoint is not None:
            self._restore(checkpoint, check_config=True)
        else:
            torch.manual_seed(self.config.seed)
        self.log = MetricsLog(self.out_dir / "metrics.jsonl", resume_step=self.step if checkpoint else None,
                              enabled=self.is_main)
        last: dict[str, float] = {}
        with _progress(self.config.max_steps, self.step, self.config.progress if self.is_main else False) as bar:
            while self.step < self.config.max_steps:
                start = time.perf_counter()
                record = self._train_step()
                record["tokens_per_s"] = record["tokens"] / (time.perf_counter() - start)
                if self.step % self.config.eval_every == 0 and self.val_data is not None:
                    record.update(self.evaluate())
                if self.step % self.config.log_every == 0 or "val_loss" in record:
                    self.log.write(record)
                last = record
                bar(record)
                if self.step % self.config.save_every == 0 or self.step == self.config.max_steps:
                    self.save()
        if self.is_main:
            plot_loss_curve(self.out_dir / "metrics.jsonl", self.out_dir / "loss_curve.png")
        return last

    def _train_step(self) -> dict:
        cfg = self.config
        self.model.train()
        micro = [self._next_batch() for _ in range(cfg.grad_accum)]
        count = getattr(self.objective, "count", count_tokens)  # what the step averages over: tokens, pairs...
        step_tokens = max(1, sum(count(b) for b in micro))
        step_tokens = self._reduce_tokens(step_tokens)
        loss_total, extras, metrics = 0.0, 0.0, {}
        for i, batch in enumerate(micro):
            with self._micro_batch(last=i == len(micro) - 1):
                with self._autocast():
                    parts = self.objective(self.wrapped, batch)
                loss = parts.loss_sum * self._sum_to_mean() / step_tokens
                if parts.extra is not None:
                    loss = loss + parts.extra / len(micro)
                    extras += float(parts.extra.detach()) / len(micro)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_total += float(parts.loss_sum.detach()) / step_tokens
            for k, v in parts.metrics.items():
                metrics[k] = metrics.get(k, 0.0) + v / len(micro)
        loss_total = self._reduce_sum(loss_total)
        tokens = sum(int(v.numel()) for b in micro for k, v in b.items() if k.endswith("input_ids"))
        self.tokens_seen += tokens
        self.step += 1
        record = {"step": self.step, "tokens": tokens, **metrics}
        truncated = getattr(self.train_data, "truncated", None)  # examples cut to the context so far (SFT)
        if truncated:
            record["truncated"] = truncated
        # an objective whose loss is no positive scale (RL's surrogate hovers around 0 and changes sign) sets
        # relative_spike_guard = False: then only a NaN loss is refused
        relative = getattr(self.objective, "relative_spike_guard", True)
        verdict = self.guard.check(loss_total) if relative or loss_total != loss_total else Verdict.OK
        if verdict is not Verdict.OK:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            record.update(skipped_loss=loss_total, skipped=self.skipped)
            if verdict is Verdict.ROLLBACK:
                self._rollback()
                record["rollback_lr_scale"] = self.lr_scale
            return record
        lr = self._set_lr()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self._clip()
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        record.update(loss=loss_total, lr=lr, grad_norm=grad_norm)
        if extras:
            record["aux_term"] = extras
        return record

    def _next_batch(self) -> dict[str, torch.Tensor]:
        if self._train_iter is None:
            self._train_iter = iter(self.train_data)
        try:
            batch = next(self._train_iter)
        except StopIteration:
            raise RuntimeError(f"the training data ran out at step {self.step}; make it repeat (epochs) "
                               f"or lower max_steps") from None
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _set_lr(self) -> float:
        lr = self.config.lr * self.schedule(self.step - 1) * self.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _clip(self) -> float:
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.config.clip_grad_norm is None:
            return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))) if params else 0.0
        return float(torch.nn.utils.clip_grad_norm_(params, self.config.clip_grad_norm))

    def _autocast(self):
        if self.config.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    # hooks for data-parallel training (see distributed.py); in one process they do nothing
    def _reduce_tokens(self, tokens: int) -> int:
        """The step's count over all ranks."""
        return tokens

    def _reduce_sum(self, value: float) -> float:
        return value

    def _sum_to_mean(self) -> float:
        """DDP averages gradients over ranks; this factor turns that average back into the sum."""
        return 1.0

    def _micro_batch(self, last: bool):
        """Context for one micro-batch's forward and backward (DDP: no gradient sync until the last)."""
        return contextlib.nullcontext()

    # --- validation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean token loss over up to ``eval_batches`` validation batches, and its perplexity."""
        self.model.eval()
        total, tokens = 0.0, 0
        for i, batch in enumerate(self.val_data):
            if i >= self.config.eval_batches:
                break
            batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with self._autocast():
                parts = self.objective(self.wrapped, batch)
            total += float(parts.loss_sum)
            tokens += parts.tokens
        if tokens == 0:
            raise ValueError("the validation data has no tokens to score")
        loss = total / tokens
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    # --- checkpoints ----------------------------------------------------------------------------
    def state(self, optimizer_state: dict | None = None) -> dict:
        return {
            "step": self.step, "lr_scale": self.lr_scale, "tokens_seen": self.tokens_seen, "skipped": self.skipped,
            "optimizer": optimizer_state if optimizer_state is not None else self.optimizer.state_dict(),
            "guard": self.guard.state_dict(), "rng": rng_state(),
            "data": self.train_data.state_dict() if hasattr(self.train_data, "state_dict") else None,
            "scaler": self.scaler.state_dict() if self.scaler else None, "run_info": self.run_info,
        }

    def save(self) -> Path | None:
        if not self.is_main:
            return None
        return save_checkpoint(self.out_dir, self.step, lambda d: self.save_weights(self.model, d), self.state(),
                               self.config.keep_checkpoints)

    def _restore(self, checkpoint: Path, check_config: bool) -> None:
        check = (lambda saved: _check_same_run(saved, self.run_info, checkpoint)) if check_config else None
        state = load_state(checkpoint, check)  # the run identity is checked before any tensor is read
        self._restore_model_and_optimizer(checkpoint, state)
        if state["data"] is not None and check_config:  # a rollback keeps reading forward
            self.train_data.load_state_dict(state["data"])
            self._train_iter = None
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        if check_config:
            self.step, self.lr_scale = state["step"], state["lr_scale"]
            self.tokens_seen, self.skipped = state["tokens_seen"], state["skipped"]
            self.guard.load_state_dict(state["guard"])
            set_rng_state(state["rng"])

    def _restore_model_and_optimizer(self, checkpoint: Path, state: dict) -> None:
        self.load_weights(self.model, checkpoint)
        self.optimizer.load_state_dict(state["optimizer"])

    def _rollback(self) -> None:
        """Reload weights and optimizer from the last checkpoint (keep the data position and step: the
        batches that blew up are not replayed) and lower the learning rate."""
        checkpoint = latest_checkpoint(self.out_dir)
        if checkpoint is not None:
            self._restore(checkpoint, check_config=False)
        self.lr_scale *= self.config.rollback_lr_factor


def _defining_fields(config: TrainConfig) -> dict:
    return {f.name: getattr(config, f.name) for f in fields(config) if f.name not in TrainConfig.RESUMABLE_CHANGES}


def _check_same_run(saved: dict, current: dict, checkpoint: Path) -> None:
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}"
             for k in sorted(set(saved) | set(current)) if k != "train" and saved.get(k) != current.get(k)]
    saved_t, cur_t = saved.get("train", {}), current.get("train", {})
    diffs += [f"train.{k}: checkpoint {saved_t.get(k)!r}, now {cur_t.get(k)!r}"
              for k in sorted(set(saved_t) | set(cur_t)) if saved_t.get(k) != cur_t.get(k)]
    if diffs:
        raise ValueError(f"{checkpoint} belongs to a different run; refusing to resume (nothing was written). "
                         "Differences: " + "; ".join(diffs) + ". Use another out_dir, or resume=False to start over.")


def default_save_weights(model: nn.Module, directory: Path, family=None) -> None:
    """A lucidlm Transformer in ``family``'s HF layout (lucidlm's own by default; bind it with
    functools.partial); any other module as model.safetensors with its own parameter names."""
    from ..checkpoint.loader import save_model
    from ..model.transformer import Transformer

    if isinstance(model, Transformer):
        save_model(model, directory, family)
        return
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
              str(directory / "model.safetensors"))


def default_load_weights(model: nn.Module, directory: Path) -> None:
    from ..checkpoint.loader import load_model
    from ..model.transformer import Transformer

    if isinstance(model, Transformer):
        loaded = load_model(directory, dtype=next(model.parameters()).dtype, device="cpu").model
        state = loaded.state_dict()
    else:
        from safetensors.torch import load_file

        state = load_file(str(directory / "model.safetensors"))
    with torch.no_grad():
        for name, p in model.state_dict().items():
            p.copy_(state[name])


@contextlib.contextmanager
def _progress(total: int, done: int, enabled: bool | None):
    """Yields update(record): a rich bar with loss, tokens/s and ETA."""
    import sys

    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield lambda record: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task("train", total=total, completed=done, info="")

        def update(record: dict) -> None:
            loss = record.get("loss", record.get("skipped_loss"))
            info = f"loss {loss:.3f}  {record['tokens_per_s']:.0f} tok/s"
            if "val_loss" in record:
                info += f"  val {record['val_loss']:.3f}"
            bar.update(task, advance=1, info=info)

        yield update

