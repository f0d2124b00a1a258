"""``lucidlm bench --long``: perplexity beyond the trained context, per way of extending it.

Two small byte-level models are trained here on the project's generated town corpus (train/corpus.py) at
context 256, the same way: one with RoPE, one with ALiBi. Each is then evaluated, without further training, on
held-out documents at 256 / 512 / 1024 / 2048 tokens. The RoPE model is evaluated once per way of applying
it beyond its context, chosen at inference only (factor = length / 256 where the kind takes one):

- none: plain RoPE, positions past 255 never seen in training;
- PI (``linear``), NTK (``ntk``), dynamic NTK (``dynamic``, factor 1: the base grows with the length itself),
  NTK-by-parts (``ntk_by_parts``) and YaRN (``yarn``, with its attention temperature): model/rope.py;
- DCA: dual chunk attention, ChunkLlama's chunking for a 256-token model (model/dual_chunk_attention.py).

Byte-level text makes a 256-token window about four sentences, less than most documents, so later tokens
can use more context than training gave them. Perplexity is exp(mean next-token loss) over every predicted
token of each window; all lengths start their windows at the same offsets of the held-out stream.

Trained models are kept under ``out/<fingerprint of the settings>/`` (the trainer's checkpoints), so a second
run only evaluates. Writes ``table.md``, ``results.json`` and ``long_context.png`` there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..atomic_io import write_text
from ..config import DualChunkConfig, ModelConfig, RopeScaling
from ..model.transformer import Transformer
from ..progress import progress_bar
from ..tokenizer import byte_tokenizer

KINDS = ("none", "PI", "NTK", "dynamic NTK", "NTK-by-parts", "YaRN", "DCA", "ALiBi")


@dataclass
class LongBenchConfig:
    """The models, their training and the evaluation; ``quick()`` is a seconds-long smoke-test setting."""

    dim: int = 192
    n_layers: int = 4
    n_heads: int = 4
    ffn_dim: int = 512
    train_len: int = 256
    eval_lens: tuple[int, ...] = (256, 512, 1024, 2048)
    steps: int = 400
    batch: int = 8
    lr: float = 2e-3
    documents: int = 3000  # of the generated corpus; val_percent of them are held out
    population: int = 200  # people of the town: more than a short run memorises, so context helps
    val_percent: float = 10.0
    windows: int = 3  # evaluation windows per length
    seed: int = 0

    @classmethod
    def quick(cls) -> LongBenchConfig:
        return cls(dim=32, n_layers=1, n_heads=2, ffn_dim=64, train_len=16, eval_lens=(16, 32, 64), steps=3,
                   batch=2, documents=40, population=20, val_percent=50.0, windows=1)

    def model_config(self, positions: str) -> ModelConfig:
        tok = byte_tokenizer()
        return ModelConfig(vocab_size=tok.vocab_size, dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
                           ffn_dim=self.ffn_dim, max_seq_len=self.train_len, positions=positions,
                           eos_token_id=tok.eos_token_id, tie_embeddings=True)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def inference_config(trained: ModelConfig, kind: str, length: int) -> ModelConfig:
    """The trained RoPE model's config with ``kind`` applied for sequences of ``length`` tokens."""
    original = trained.max_seq_len
    factor = max(length / original, 1.0)
    scaling = {"none": None, "PI": "linear", "NTK": "ntk", "NTK-by-parts": "ntk_by_parts", "YaRN": "yarn"}
    changes: dict = {"max_seq_len": max(length, original)}
    if kind == "dynamic NTK":
        changes["rope_scaling"] = RopeScaling(type="dynamic", factor=1.0, original_max_seq_len=original)
    elif kind == "DCA":
        changes["dual_chunk"] = DualChunkConfig.for_trained_length(original)
    elif scaling.get(kind):
        changes["rope_scaling"] = RopeScaling(type=scaling[kind], factor=factor, original_max_seq_len=original)
    elif kind not in scaling and kind != "ALiBi":
        raise ValueError(f"unknown long-context kind {kind!r}; known: {list(KINDS)}")
    return trained.replace(**changes)


def write_corpus_files(cfg: LongBenchConfig, out: Path) -> list[Path]:
    from ..train.corpus import write_corpus

    return write_corpus(out / "corpus", documents=cfg.documents, files=1, seed=cfg.seed, population=cfg.population)


def train_model(cfg: LongBenchConfig, positions: str, files: list[Path], out: Path) -> Transformer:
    """Train (or resume, or reuse: the trainer's checkpoints in ``out``) a model at ``cfg.train_len``."""
    from ..train.pretrain_data import PackedTextDataset
    from ..train.trainer import TrainConfig, Trainer

    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.model_config(positions))
    model.init_weights(torch.Generator().manual_seed(cfg.seed))
    data = PackedTextDataset(files, byte_tokenizer(), cfg.train_len, cfg.batch, split="train",
                             val_percent=cfg.val_percent)
    train = TrainConfig(out_dir=str(out), max_steps=cfg.steps, lr=cfg.lr, warmup_steps=max(cfg.steps // 20, 1),
                        save_every=cfg.steps, keep_checkpoints=1, seed=cfg.seed, device="cpu", log_every=10)
    Trainer(model, train, data, run_info={"model": cfg.model_config(positions).to_dict()}).fit()
    return model.eval()


def held_out_stream(cfg: LongBenchConfig, files: list[Path]) -> torch.Tensor:
    """The held-out documents' tokens, each closed by EOS, as one stream long enough for every window."""
    from ..train.pretrain_data import PackedTextDataset

    needed = cfg.windows * (max(cfg.eval_lens) + 1)
    val = PackedTextDataset(files, byte_tokenizer(), needed, 1, epochs=1, split="val", val_percent=cfg.val_percent)
    batch = next(iter(val), None)
    if batch is None:
        raise ValueError(f"the held-out documents hold fewer than {needed} tokens: raise documents or val_percent")
    return batch["input_ids"][0]


@torch.no_grad()
def perplexity(model: Transformer, stream: torch.Tensor, length: int, windows: int, stride: int) -> float:
    """exp(mean next-token loss) over ``windows`` windows of ``length`` predicted tokens, ``stride`` apart."""
    total, count = 0.0, 0
    for w in range(windows):
        ids = stream[w * stride: w * stride + length + 1][None]
        logits = model(ids[:, :-1])
        total += float(F.cross_entropy(logits[0].float(), ids[0, 1:], reduction="sum"))
        count += length
    return math.exp(total / count)


def with_config(model: Transformer, cfg: ModelConfig) -> Transformer:
    """The same weights under another config (RoPE scaling or DCA chosen at inference)."""
    other = Transformer(cfg).eval()
    other.load_state_dict(model.state_dict())
    return other


def run_long_bench(cfg: LongBenchConfig | None = None, out: Path = Path("runs/bench-long"),
                   print_fn: Callable[[str], None] = print, progress: bool | None = None) -> dict:
    """Train (or reuse) both models, evaluate every kind at every length; returns the results dict."""
    cfg = cfg or LongBenchConfig()
    began = time.perf_counter()
    out = Path(out).resolve() / cfg.fingerprint()  # absolute: a resumed run's data position names its files
    files = write_corpus_files(cfg, out)
    models = {}
    for positions in ("rope", "alibi"):
        start = time.perf_counter()
        models[positions] = train_model(cfg, positions, files, out / positions)
        print_fn(f"{positions} model ready ({time.perf_counter() - start:.0f} s)")
    stream = held_out_stream(cfg, files)
    stride = max(cfg.eval_lens) + 1
    table: dict[str, dict[int, float]] = {kind: {} for kind in KINDS}
    with progress_bar(len(KINDS) * len(cfg.eval_lens), "evaluating", enabled=progress) as advance:
        for kind in KINDS:
            for length in cfg.eval_lens:
                trained = models["alibi" if kind == "ALiBi" else "rope"]
                model = with_config(trained, inference_config(trained.config, kind, length))
                table[kind][length] = perplexity(model, stream, length, cfg.windows, stride)
                advance(1)
    result = {"config": dataclasses.asdict(cfg), "perplexity": table, "seconds": time.perf_counter() - began,
              "parameters": models["rope"].num_parameters(), "dca": dataclasses.asdict(
                  DualChunkConfig.for_trained_length(cfg.train_len)), "out": str(out)}
    write_text(out / "results.json", json.dumps(result, indent=1))
    write_text(out / "table.md", long_table(result) + "\n")
    plot(result, out / "long_context.png")
    return result


def long_table(result: dict) -> str:
    """Rows: kinds; columns: evaluation lengths; cells: perplexity (the trained length's column first)."""
    cfg, table = result["config"], result["perplexity"]
    lens = cfg["eval_lens"]
    lines = ["| kind | " + " | ".join(f"{n}" for n in lens) + " |", "|---" * (len(lens) + 1) + "|"]
    for kind, row in table.items():
        lines.append(f"| {kind} | " + " | ".join(f"{row[n]:.2f}" for n in lens) + " |")
    dca = result["dca"]
    return (f"Perplexity (byte-level, held-out town documents) of models trained at {cfg['train_len']} tokens "
            f"({result['parameters'] / 1e6:.1f}M parameters, {cfg['steps']} steps of {cfg['batch']} × "
            f"{cfg['train_len']}), evaluated at each length, {cfg['windows']} windows each\n\n" + "\n".join(lines)
            + f"\n\nDCA: chunk {dca['chunk_size']}, local window {dca['local_window']} (largest relative position "
            f"{dca['chunk_size'] + dca['local_window'] - 1}); scaling factor = length / {cfg['train_len']}; "
            f"wall time {result['seconds']:.0f} s")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lens = result["config"]["eval_lens"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, row in result["perplexity"].items():
        ax.plot(lens, [row[n] for n in lens], marker="o", label=kind)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lens, [str(n) for n in lens])
    ax.axvline(result["config"]["train_len"], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"Beyond the trained context ({result['config']['train_len']} tokens)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
