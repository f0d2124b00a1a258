"""``lucidlm bench --deepnorm``: DeepNet's claim (Wang et al. 2022) in miniature: a deep, thin stack trained with Adam
at one learning rate, no warmup, as post-LN, DeepNorm and pre-LN, on sequences following a random permutation of the
vocabulary (next = perm[current]; ln(vocab) = learned nothing). Post-LN is the paper's baseline (Xavier-normal, gain
1, on every block matrix): DeepNorm differs only by α and the β gains; pre-LN has lucidlm's ordinary init."""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..model.transformer import Transformer

PLACEMENTS = {"post": "post-LN (Xavier, gain 1)", "deepnorm": "DeepNorm (α, β)", "pre": "pre-LN"}  # table labels


@dataclass(frozen=True)
class DeepNormBench:
    layers: int = 24
    dim: int = 16  # ffn 2 × dim, 4 heads
    vocab: int = 64
    steps: int = 25
    lr: float = 2e-2
    batch: int = 8  # sequences of seq_len + 1 tokens per step
    seq_len: int = 16
    seeds: tuple[int, ...] = (0, 1, 2)


def build_model(bench: DeepNormBench, placement: str, generator: torch.Generator) -> Transformer:
    model = Transformer(ModelConfig(vocab_size=bench.vocab, dim=bench.dim, n_layers=bench.layers, n_heads=4,
                                    ffn_dim=2 * bench.dim, max_seq_len=bench.seq_len, norm="layernorm",
                                    norm_placement=placement, gated_mlp=False, activation="gelu"))
    model.init_weights(generator)
    for name, p in model.named_parameters():  # nn.init runs under no_grad
        if placement == "post" and name.startswith("blocks.") and p.dim() == 2:
            torch.nn.init.xavier_normal_(p, generator=generator)
    return model


def train_losses(bench: DeepNormBench, placement: str, seed: int) -> list[float]:  # up to a non-finite one
    model = build_model(bench, placement, torch.Generator().manual_seed(seed))
    data = torch.Generator().manual_seed(1000 + seed)
    successor = torch.randperm(bench.vocab, generator=data)
    optimizer = torch.optim.Adam(model.parameters(), lr=bench.lr)
    losses = []
    for _ in range(bench.steps):
        ids = torch.randint(0, bench.vocab, (bench.batch, 1), generator=data)
        while ids.shape[1] <= bench.seq_len:  # -> (batch, seq_len + 1)
            ids = torch.cat([ids, successor[ids[:, -1:]]], 1)
        loss = F.cross_entropy(model(ids[:, :-1]).reshape(-1, bench.vocab), ids[:, 1:].reshape(-1))
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return losses


def run_deepnorm_bench(bench: DeepNormBench = DeepNormBench()) -> dict[str, list[list[float]]]:
    """placement -> one loss curve per seed. One thread: a width-16 model's products are too small to split."""
    threads, _ = torch.get_num_threads(), torch.set_num_threads(1)
    try:
        return {p: [train_losses(bench, p, seed) for seed in bench.seeds] for p in PLACEMENTS}
    finally:
        torch.set_num_threads(threads)


def deepnorm_table(result: dict[str, list[list[float]]], bench: DeepNormBench = DeepNormBench()) -> str:
    def last(curve: list[float]) -> str:  # the mean of the last 5 steps, or where it diverged
        return f"{sum(curve[-5:]) / len(curve[-5:]):.2f}" if len(curve) == bench.steps else f"NaN at step {len(curve)}"
    lines = [f"{bench.layers} layers × width {bench.dim}, Adam lr {bench.lr:g}, no warmup, {bench.steps} steps, seeds "
             f"{', '.join(map(str, bench.seeds))}; chance = ln {bench.vocab} = {math.log(bench.vocab):.2f}\n",
             "| placement | loss at step 1 | mean of the last 5 steps | lowest loss |", "|---|---|---|---|"]
    for p, curves in result.items():
        lines.append(f"| {PLACEMENTS[p]} | {' / '.join(f'{c[0]:.2f}' for c in curves)} "
                     f"| {' / '.join(map(last, curves))} "
                     f"| {min(x for c in curves for x in c if math.isfinite(x)):.2f} |")
    return "\n".join(lines)
