"""What ``lucidlm probe train / eval / sweep`` do: annotated JSONL in, a probe directory or a report out."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ..checkpoint.loader import load_model
from ..jsonl import DataError, read_rows, write_json
from ..model.lora import TARGETS, LoRAConfig
from ..probe.data import LabeledExample, LabelStats, label_row
from ..probe.evaluate import evaluate_probe, method_scores, report
from ..probe.features import extract
from ..probe.plots import plot_auroc_per_layer
from ..probe.probe import ProbeConfig, save_probe
from ..probe.train import ProbeTrainConfig, sweep, train_probe
from ..tokenizer import Tokenizer, pad_id
from ..train.checkpointing import ensure_writable_dir
from ..train.config_file import opt


@dataclass
class ProbeLoRA:
    r: int = opt(16, "LoRA rank on the blocks up to the probed layer")
    alpha: float = opt(32.0, "LoRA alpha")
    dropout: float = opt(0.05, "LoRA dropout")
    targets: list[str] = opt(factory=lambda: list(TARGETS), help="Linear layers to adapt")
    kl_weight: float = opt(0.5, "weight of KL(base || probed) on next-token distributions (keeps generation intact)")
    lr: float = opt(1e-4, "LoRA learning rate")


@dataclass
class ProbeRun:
    model: str | None = opt(None, "checkpoint directory of the model to probe")
    data: list[str] = opt(factory=list, help="annotated JSONL: {conversation, annotations:[{span,label,index}]}")
    val_data: list[str] = opt(factory=list, help="annotated JSONL for the evaluation printed at the end")
    layer: int = opt(-1, "block whose output is probed (negative: from the end)")
    alignment: str = opt("own", "which state scores token t: 'own' (h[t], the reference code) or 'predictive' (h[t-1])")
    l2: float = opt(1e-3, "L2 penalty on the head's weights")
    layers: list[int] = opt(factory=list, help="sweep: the blocks to train a head on (default: all)")
    steps: int = opt(300, "optimizer steps")
    batch_size: int = opt(8, "conversations per step")
    lr: float = opt(1e-2, "head learning rate")
    anneal_fraction: float = opt(1.0, "span-max loss weight reaches 1 after this fraction of training")
    lora: ProbeLoRA | None = opt(None, "also train LoRA on blocks 0..layer (--lora for defaults)")
    out: str = opt("probe", "probe directory to write (probe_config.json, probe_head.safetensors, adapter)")
    seed: int = opt(0, "seed")


def read_examples(files: list[str], tokenizer: Tokenizer, max_len: int | None = None
                  ) -> tuple[list[LabeledExample], LabelStats]:
    """max_len: the model's context; longer conversations are cut to it and counted (``stats.truncated``)."""
    stats = LabelStats()
    rows: list[LabeledExample] = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        rows += [ex for _, ex in read_rows(path, 0, lambda r: _label(r, tokenizer, stats, max_len), False, print)]
    if not rows:
        raise ValueError(f"no annotated conversations in {files}")
    return rows, stats


def _label(row: dict, tokenizer: Tokenizer, stats: LabelStats, max_len: int | None) -> LabeledExample:
    try:
        return label_row(row, tokenizer, stats, max_len)
    except (ValueError, KeyError, TypeError) as e:  # reported with the file and line by read_rows
        raise DataError(str(e)) from None


def _block(layer: int, n: int, what: str = "layer") -> int:
    """A block index (negative: from the end) checked against the model's ``n`` blocks."""
    if not -n <= layer < n:
        raise ValueError(f"{what} {layer} out of range for a model of {n} blocks")
    return layer % n


def _setup(run: ProbeRun):
    if run.model is None:
        raise ValueError("give the model to probe: --model DIR")
    ensure_writable_dir(run.out, "probe directory")  # before the model is loaded and features extracted
    loaded = load_model(run.model)
    tokenizer = Tokenizer.from_dir(run.model)
    if tokenizer is None:
        raise ValueError(f"{run.model}: no tokenizer.json")
    n = loaded.config.n_layers
    layer = _block(run.layer, n)
    run.layers = [_block(x, n, "sweep layer") for x in run.layers]
    pad = pad_id(tokenizer)
    return loaded, tokenizer, layer, pad


def _train_config(run: ProbeRun, layer: int) -> ProbeTrainConfig:
    lora = None
    if run.lora is not None:
        lora = LoRAConfig(r=run.lora.r, alpha=run.lora.alpha, dropout=run.lora.dropout,
                          target_modules=tuple(run.lora.targets))
    return ProbeTrainConfig(layer=layer, alignment=run.alignment, l2=run.l2, steps=run.steps,
                            batch_size=run.batch_size, lr=run.lr,
                            anneal_fraction=run.anneal_fraction, lora=lora,
                            lora_lr=run.lora.lr if run.lora else 1e-4,
                            kl_weight=run.lora.kl_weight if run.lora else 0.0, seed=run.seed)


def run_probe_train(run: ProbeRun) -> dict:
    loaded, tokenizer, layer, pad = _setup(run)
    context = loaded.config.max_seq_len
    train, stats = read_examples(run.data, tokenizer, context)
    head = train_probe(loaded.model, train, _train_config(run, layer), pad)
    config = ProbeConfig(layer, loaded.config.dim, loaded.config.n_layers, alignment=run.alignment)
    save_probe(run.out, head, config, loaded.model, loaded.family)
    report = {"probe": run.out, "layer": layer, "train": asdict(stats)}
    if run.val_data:
        val, val_stats = read_examples(run.val_data, tokenizer, context)
        report["eval"] = evaluate_probe(loaded.model, head, layer, val, pad, run.alignment)
        report["eval_data"] = asdict(val_stats)
    return report


def run_probe_eval(model: str, probe: str, data: list[str]) -> dict:
    import lucidlm

    lm = lucidlm.load(model, probe=probe, device="cpu")
    examples, stats = read_examples(data, lm.tokenizer, lm.config.max_seq_len)
    pad = pad_id(lm.tokenizer)
    report = evaluate_probe(lm.model, lm.probe.head, lm.probe.config.layer, examples, pad, lm.probe.config.alignment)
    report["data"] = asdict(stats)
    return report


def run_probe_sweep(run: ProbeRun) -> dict:
    """A head per layer on --data, each measured on --val-data (span-max AUROC): one forward per conversation."""
    loaded, tokenizer, _, pad = _setup(run)
    layers = run.layers or list(range(loaded.config.n_layers))
    train, _ = read_examples(run.data, tokenizer, loaded.config.max_seq_len)
    val, _ = read_examples(run.val_data or run.data, tokenizer, loaded.config.max_seq_len)
    config = _train_config(run, layers[0])
    heads = sweep(loaded.model, train, layers, config, pad)
    val_feats = extract(loaded.model, val, layers, pad, (run.alignment,), progress=None)
    per_layer = {layer: report(val_feats, method_scores(val_feats, head, layer, run.alignment, run.seed), layer,
                               run.alignment) for layer, head in heads.items()}
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {str(layer): r["probe"]["span_max"]["auroc"] for layer, r in per_layer.items()}
    plot_auroc_per_layer(summary, out / "auroc_per_layer.png")
    write_json(out / "sweep.json", per_layer, sort_keys=False)
    return {"span_max_auroc_per_layer": summary, "report": str(out / "sweep.json")}
