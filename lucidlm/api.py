"""The public surface: ``lm = lucidlm.load(path)`` and the ``LM`` object it returns."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_model, save_model
from .checkpoint.encoder_loader import load_encoder_model, save_encoder_model
from .checkpoint.family import Family
from .checkpoint.loader import check_quantize, load_tokenizer
from .checkpoint.local_models import resolve_model_path
from .config import ModelConfig
from .device import resolve_device
from .generate import text_generation
from .generate.compiled_steps import as_mode, default_mode
from .generate.engine import ProbeScoring
from .generate.events import Completion, TokenEvent
from .generate.generation_config import GenerationConfig
from .generate.offline import Generator
from .generate.probe_guided import GuidedConfig, GuidedResult, guided_generate
from .generate.strategies import AnswerExtractor, Scorer, Vote, last_number, mean_logprob
from .generate.text_generation import Prompt
from .model.cpu_kernels import pack_linears
from .model.encoder import EncoderConfig, MaskedLM
from .model.quantize import quantize_model, require_float
from .model.transformer import Transformer
from .probe.probe import LoadedProbe, attach_probe, score_tokens
from .tokenizer import Tokenizer


@dataclass
class LM:
    """A loaded model: the nn.Module, its tokenizer and config, and where it came from."""

    model: Transformer
    tokenizer: Tokenizer | None
    config: ModelConfig
    path: Path | None = None
    family: Family | None = None
    hf_config: dict | None = None
    generation_defaults: dict = field(default_factory=dict)  # the checkpoint's generation_config.json
    compile_decode: bool | str = "off"  # decode steps as one compiled graph: "on" | "off" (see load)
    probe: LoadedProbe | None = None  # hallucination probe: generate/stream then score every token

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok().encode(text, add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok().decode(ids, skip_special_tokens)

    @property
    def eos_token_ids(self) -> list[int]:
        """Tokens that end a sequence: the tokenizer's EOS plus those of config.json and
        generation_config.json (chat models often end turns with a second one, e.g. <|eot_id|>)."""
        ids: dict[int, None] = {}  # ordered and deduplicated in linear time
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids[self.tokenizer.eos_token_id] = None
        for source in (self.hf_config or {}, self.generation_defaults):
            value = source.get("eos_token_id")
            ids.update((i, None) for i in (value if isinstance(value, list) else [value]) if isinstance(i, int))
        return list(ids)

    @torch.no_grad()
    def token_scores(self, text: str | Sequence[int]) -> list[float]:
        """The probe's score of every token of ``text`` from one full forward (position 0: NaN)."""
        if self.probe is None:
            raise ValueError("no probe loaded: lucidlm.load(path, probe=PROBE_DIR)")
        ids = self.encode(text) if isinstance(text, str) else list(text)
        layer = self.probe.config.layer
        out = self.model.forward_outputs(torch.tensor([ids], device=self.device), hidden_layers=[layer])
        return score_tokens(self.probe.head, out.hidden_states[layer], self.probe.config.alignment)[0].tolist()

    # --- generation (see lucidlm/generate) ------------------------------------------------------
    def generator(self, prefill_chunk: int = 512) -> Generator:
        """What the engine needs from this model, as plain values (generate/offline.py)."""
        probe = None
        if self.probe is not None:
            cfg = self.probe.config
            probe = ProbeScoring(self.probe.head.scores, cfg.layer, cfg.alignment)
        return Generator(self.model, self.tokenizer, tuple(self.eos_token_ids), probe, self.compile_decode,
                         prefill_chunk)

    def generate(self, prompts: Prompt | Sequence[Prompt], *, best_of: int = 1, scorer: Scorer = mean_logprob,
                 num_return_sequences: int = 1, **options: Any) -> list[Completion]:
        """One ``Completion`` (text, token_ids, logprobs, finish_reason) per prompt.

        Options: max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop,
        stop_token_ids, ignore_eos, num_beams, length_penalty, early_stopping. Greedy unless a
        sampling option is given. ``best_of=N`` keeps the best of N samples by ``scorer``.
        """
        return text_generation.generate(self.generator(), prompts, best_of_n=best_of, scorer=scorer,
                                        num_return_sequences=num_return_sequences, **options)

    def stream(self, prompt: Prompt, **options: Any) -> Iterator[TokenEvent]:
        """Yield each token's ``TokenEvent`` (token_id, text, logprob, score, finish_reason) as it is decoded."""
        return text_generation.stream(self.generator(), prompt, **options)

    def chat(self, messages: list[dict], *, stream: bool = False,
             **options: Any) -> Completion | Iterator[TokenEvent]:
        """Answer a conversation, rendered with the checkpoint's chat template."""
        ids = text_generation.chat_prompt(self.generator(), messages)
        return self.stream(ids, **options) if stream else self.generate([ids], **options)[0]

    def sample(self, prompt: Prompt, n: int, **options: Any) -> list[Completion]:
        """``n`` independent samples of one prompt (temperature 1 unless given)."""
        return text_generation.sample(self.generator(), prompt, n, **options)

    def self_consistency(self, prompt: Prompt, n: int = 8, extract: AnswerExtractor = last_number,
                         **options: Any) -> Vote:
        """Majority vote over the answers ``extract`` finds in ``n`` samples (Wang et al. 2022)."""
        return text_generation.self_consistency(self.generator(), prompt, n, extract, **options)

    def guided(self, prompts: Prompt | Sequence[Prompt], guided: GuidedConfig | None = None,
               **options: Any) -> list[GuidedResult]:
        """Probe-guided decoding (generate/probe_guided.py): when a token's live probe score passes
        ``guided.threshold``, abstain, or resample its sentence best of ``guided.k``; one ``GuidedResult`` per
        prompt. Needs a probe (``load(..., probe=)``); ``options`` as ``generate``'s."""
        gen = self.generator()
        config = GenerationConfig.from_kwargs(**options)
        return guided_generate(gen, text_generation.encode_prompts(gen, prompts), config, guided or GuidedConfig())

    def save(self, directory: str | Path) -> Path:
        """Write the model back in the checkpoint's own layout (HF families stay HF); float weights only."""
        require_float(self.model, "save")  # checkpoints hold float weights (a GGUF is read, never written)
        out = save_model(self.model, directory, self.family, self.hf_config, source=self.path)
        _save_tokenizer(self.tokenizer, out)
        return out

    def _tok(self) -> Tokenizer:
        return _require_tokenizer(self.tokenizer, self.path)

    def __repr__(self) -> str:
        n = self.model.num_parameters()
        return f"LM({self.path}, {n / 1e6:.1f}M params, {self.dtype}, {self.device})"


def default_quantize(path: Path, device: str | torch.device, adapter: str | Path | None = None,
                     probe: str | Path | None = None, pack_weights: bool = False) -> str:
    """What ``load(quantize=None)`` keeps: a GGUF file's own blocks on CPU ("gguf"), else float ("none")."""
    from .checkpoint.gguf import find_gguf
    from .probe.probe import load_probe

    if torch.device(device).type != "cpu" or find_gguf(path) is None or adapter is not None or pack_weights:
        return "none"
    if probe is not None and load_probe(probe)[1].has_adapter:  # its LoRA wraps float layers
        return "none"
    return "gguf"


def load(path: str | Path, dtype: str | torch.dtype | None = "float32", device: str | torch.device = "auto", *,
         adapter: str | Path | None = None, probe: str | Path | None = None,
         compile: bool | str | None = None, pack_weights: bool = False, quantize: str | None = None) -> LM:
    """Load a Hugging Face-format checkpoint directory (config.json + safetensors + tokenizer.json), a GGUF
    file (or a directory holding one), or a named local model (``"smollm2-135m-instruct"``, see
    checkpoint/local_models.py). A GGUF model's ``save`` writes the Hugging Face layout.

    dtype: "float32", "bfloat16", "float16" or "auto" (the checkpoint's own). device: "auto"
    picks CUDA when available, else CPU.
    compile: decode steps as one compiled graph (about 2x the tokens per second of eager steps at
    batch 1 on CPU): "on" / True (the default on CPU, or ``LUCIDLM_COMPILE``) builds each step shape
    before its first step, loaded from ~/.cache/lucidlm/compiled in about a second or compiled once per
    machine (tens of seconds) and saved there; "off" / False never (the default on CUDA). See
    generate/compiled_steps.py.
    adapter: an adapter directory to apply: PEFT LoRA (adapter_config.json + adapter_model.safetensors) or a
    lucidlm bottleneck adapter (bottleneck_adapter_config.json + bottleneck_adapter.safetensors).
    probe: a probe directory (probe_config.json + probe_head.safetensors [+ its LoRA adapter]): then
    ``generate``/``stream`` give every token a hallucination score and ``token_scores`` scores a text.
    pack_weights: (CPU) keep a copy of every linear weight in oneDNN's blocked layout, which it
    multiplies about twice as fast as the plain one, for prefill and decode; costs the weights' size again.
    quantize: (CPU) weight-only quantized linear layers, multiplied as integers by lucidlm's kernels (torch's
    where the CPU lacks AVX2): "gguf" keeps a GGUF file's Q8_0 / Q4_0 / Q4_1 weights as stored; "int8" / "int4"
    quantize any checkpoint (per-row int8; 4-bit in groups of 32 with a scale and minimum, as Q4_1, the head at
    8 bits); "none" reads float weights. None (the default): "gguf" for a GGUF file on CPU, as llama.cpp runs it,
    unless LoRA has to wrap float layers (an adapter, a probe with LoRA); "none" otherwise
    (``default_quantize``). The embedding stays float; a quantized model does not train (load it with
    quantize="none" to fine-tune). See model/quantized_linear.py.
    """
    path = resolve_model_path(path)
    target = resolve_device(device)
    mode = as_mode(compile) if compile is not None else default_mode() if torch.device(target).type == "cpu" else "off"
    if pack_weights and torch.device(target).type != "cpu":
        raise ValueError(f"pack_weights is a CPU layout (oneDNN); the device is {target}")
    if quantize is None:
        quantize = default_quantize(path, target, adapter, probe, pack_weights)
    if pack_weights and quantize != "none":
        raise ValueError(f"pack_weights packs float weights; quantize={quantize!r} keeps them as integers: choose one")
    check_quantize(quantize, target)
    if quantize == "gguf" and adapter is not None:
        raise ValueError("a LoRA adapter on GGUF-quantized weights is not supported: quantize='int8' or 'int4' "
                         "(applied after the adapter), or 'none'")
    # int8 / int4 quantize after an adapter or probe is attached, so that LoRA wraps float layers first
    loaded = load_model(path, dtype=dtype, device=target, quantize="gguf" if quantize == "gguf" else "none")
    if adapter is not None:
        _apply_adapter(loaded, adapter)
        loaded.model.eval()
    attached = None
    if probe is not None:
        attached = attach_probe(loaded.model, probe, loaded.family)
    if quantize in ("int8", "int4"):
        quantize_model(loaded.model, quantize)
    if pack_weights:
        pack_linears(loaded.model)
    tokenizer, defaults = load_tokenizer(path, loaded.config)  # files read and token ids checked in checkpoint/
    return LM(loaded.model, tokenizer, loaded.config, path, loaded.family, loaded.hf_config, defaults,
              compile_decode=mode, probe=attached)


# --- encoder-only masked LMs (BERT) -------------------------------------------------------------
@dataclass
class EncoderLM:
    """A loaded encoder-only masked LM: the ``MaskedLM`` module, its tokenizer and config. It has no ``generate``
    (a bidirectional encoder has no left-to-right distribution to sample from); ``model(ids, attention_mask,
    token_type_ids)`` gives the logits of the token at every position."""

    model: MaskedLM
    tokenizer: Tokenizer | None
    config: EncoderConfig
    path: Path | None = None
    hf_config: dict | None = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok().encode(text, add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok().decode(ids, skip_special_tokens)

    def save(self, directory: str | Path) -> Path:
        """The bert layout (config.json + model.safetensors) and the tokenizer: transformers' BertForMaskedLM
        and ``load_encoder`` read it back."""
        out = save_encoder_model(self.model, directory, self.hf_config, source=self.path)
        _save_tokenizer(self.tokenizer, out)
        return out

    def _tok(self) -> Tokenizer:
        return _require_tokenizer(self.tokenizer, self.path)

    def __repr__(self) -> str:
        n = self.model.num_parameters()
        dtype = next(self.model.parameters()).dtype
        return f"EncoderLM({self.path}, {n / 1e6:.1f}M params, {dtype})"


def load_encoder(path: str | Path, dtype: str | torch.dtype | None = "float32",
                 device: str | torch.device = "auto") -> EncoderLM:
    """Load an encoder-only masked LM checkpoint (``model_type: bert``: config.json + safetensors [+ tokenizer]),
    as transformers' ``AutoModelForMaskedLM`` does; ``load`` is for causal LMs and refuses these.
    dtype: "float32", "bfloat16", "float16" or "auto". device: "auto" picks CUDA when available."""
    path = Path(path)
    loaded = load_encoder_model(path, dtype=dtype, device=resolve_device(device))
    tokenizer = Tokenizer.from_dir(path)
    if tokenizer is not None and (largest := tokenizer.max_token_id()) >= loaded.config.vocab_size:
        raise ValueError(f"{path / 'tokenizer.json'}: the tokenizer has token ids up to {largest}, but the model's "
                         f"embedding has {loaded.config.vocab_size} rows (vocab_size)")
    return EncoderLM(loaded.model, tokenizer, loaded.config, path, loaded.hf_config)


def _apply_adapter(loaded, adapter: str | Path) -> None:
    """A lucidlm bottleneck adapter (checkpoint/bottleneck_adapter.py) or a PEFT LoRA one (checkpoint/peft_adapter.py),
    told apart by their config files."""
    from .checkpoint import bottleneck_adapter, peft_adapter
    from .checkpoint.errors import CheckpointError
    from .checkpoint.files import has_file

    if has_file(adapter, bottleneck_adapter.CONFIG_FILE):
        bottleneck_adapter.load_bottleneck_adapter(loaded.model, adapter)
    elif has_file(adapter, peft_adapter.CONFIG_FILE):
        peft_adapter.load_adapter(loaded.model, loaded.family, adapter)
    else:
        raise CheckpointError(f"{adapter}: no {peft_adapter.CONFIG_FILE} (a PEFT LoRA adapter) nor "
                              f"{bottleneck_adapter.CONFIG_FILE} (a lucidlm bottleneck adapter)")


def _save_tokenizer(tokenizer: Tokenizer | None, out: Path) -> None:
    """A saved checkpoint carries its tokenizer unless the writer already put one there."""
    if tokenizer is not None and not (Path(out) / "tokenizer.json").exists():
        tokenizer.save(out)


def _require_tokenizer(tokenizer: Tokenizer | None, path: Path | None) -> Tokenizer:
    if tokenizer is None:
        raise ValueError(f"{path}: this checkpoint has no tokenizer.json, so text cannot be encoded")
    return tokenizer
