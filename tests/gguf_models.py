"""Tiny random Llama / Qwen2 / Qwen3 models written as GGUF files with the ``gguf`` package's writer,
the way llama.cpp's converter writes them (llama.cpp names, Llama's Q/K rows permuted, 2-D weights
quantized, norms and biases F32), plus a small byte-level BPE tokenizer with ChatML specials."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hf_models import build_hf_model

CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = ["<think>"]
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Héllo wörld, ça va? Naïve café, señor, Größe.",
    "日本語のテキストと中文的句子。한국어 문장도 있습니다.",
    "Emoji: 🎉🤖👍🏽 and more 🙂. Don't stop; we'll see what they've done.",
    "def main():\n    return 42  # numbers 12345 and 3.14159\n",
] * 20
# what the tests' config needs on top of hf_models.TINY, per GGUF architecture (qwen3: transformers' GGUF
# reader ignores attention.key_length and takes Qwen3Config's default head_dim of 128)
HF_OVERRIDES = {
    "llama": dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0), tie_word_embeddings=True),
    "qwen2": dict(rope_parameters=dict(rope_type="default", rope_theta=1e6), tie_word_embeddings=False),
    "qwen3": dict(head_dim=128, rope_parameters=dict(rope_type="default", rope_theta=1e6), tie_word_embeddings=False),
    # what a GGUF leaves out takes Gemma3TextConfig's defaults: query_pre_attn_scalar, the 5:1 layer pattern
    # (6 layers: one global), the sliding layers' RoPE base
    "gemma3": dict(head_dim=16, query_pre_attn_scalar=256, sliding_window=4, num_hidden_layers=6, layer_types=None,
                   rope_parameters=dict(full_attention=dict(rope_type="default", rope_theta=1e6),
                                        sliding_attention=dict(rope_type="default", rope_theta=1e4))),
}
HF_KIND = {"gemma3": "gemma3_text"}  # GGUF architecture -> hf_models family
GGUF_NAMES = [  # Hugging Face suffix -> llama.cpp name (per layer); Gemma 3's sandwich norms first
    ("post_attention_layernorm.weight@gemma3", "post_attention_norm.weight"),
    ("pre_feedforward_layernorm.weight@gemma3", "ffn_norm.weight"),
    ("post_feedforward_layernorm.weight@gemma3", "post_ffw_norm.weight"),
    ("input_layernorm.weight", "attn_norm.weight"), ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"), ("self_attn.q_norm.weight", "attn_q_norm.weight"),
    ("self_attn.k_norm.weight", "attn_k_norm.weight"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
]


def _write_hyperparameters(w, cfg) -> None:
    """The shape fields every architecture's GGUF header carries, from a transformers config."""
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)


@functools.cache
def train_tokenizer(vocab_size: int = 400):
    """A byte-level BPE with ChatML specials first (ids 0-2), like SmolLM's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=CHATML + USER_DEFINED, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def gguf_name(hf: str, arch: str = "llama") -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    layer, rest = hf.removeprefix("model.layers.").split(".", 1)
    for suffix, name in GGUF_NAMES:
        suffix, _, only = suffix.partition("@")
        if rest.startswith(suffix) and only in ("", arch):
            return f"blk.{layer}.{name}{rest[len(suffix):]}"
    raise KeyError(hf)


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Llama's Q/K rows (halves -> interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class GGUFModel:
    path: Path
    source: torch.nn.Module  # the transformers model it was written from
    dequantized: torch.nn.Module | None  # the same model with every weight quantized and dequantized back
    tokenizer: object  # the tokenizers.Tokenizer its vocabulary came from


def write_gguf(path: Path, arch: str = "llama", qtype: str = "F32", seed: int = 0, add_bos: bool = False,
               pre: str = "gpt2", extra=None, with_dequantized: bool = True, **overrides) -> GGUFModel:
    """extra(writer): a hook to add metadata / tensors (for the error tests); overrides: config fields."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    tok = train_tokenizer()
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    config = {**HF_OVERRIDES[arch], **overrides, "vocab_size": len(tokens)}
    kind = HF_KIND.get(arch, arch)
    model = build_hf_model(kind, seed, **config)
    dequantized = build_hf_model(kind, seed, **config) if with_dequantized else None
    cfg = model.config
    qkind = Q[qtype]
    w = gguf.GGUFWriter(path, arch)
    if arch == "gemma3":
        w.add_sliding_window(cfg.sliding_window)
    _write_hyperparameters(w, cfg)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    w.add_rope_freq_base(rope["rope_theta"])
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    types = [3 if t in CHATML else 4 if t in USER_DEFINED else 1 for t in tokens]
    w.add_token_types(types)
    merges = [" ".join(m) if isinstance(m, list) else m for m in json.loads(tok.to_str())["model"]["merges"]]
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_pad_token_id(vocab["<|im_end|>"])
    w.add_unk_token_id(vocab["<|endoftext|>"])
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHAT_TEMPLATE)
    state = {n: t.detach().float().numpy() for n, t in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    deq_state = {}
    for name, t in state.items():
        data = t
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
            data = permute(t, heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            data = data + 1  # llama.cpp stores Gemma's (1 + w) norm weights as the factor itself
        if t.ndim == 2 and qkind != Q.F32:
            raw = gguf.quants.quantize(data, qkind)
            w.add_tensor(gguf_name(name, arch), raw, raw_dtype=qkind)
            if with_dequantized:
                deq = gguf.quants.dequantize(gguf.quants.quantize(t, qkind), qkind)
                deq_state[name] = torch.from_numpy(deq.copy())
        else:
            w.add_tensor(gguf_name(name, arch), np.ascontiguousarray(data, dtype=np.float32))
            deq_state[name] = torch.from_numpy(t.copy())
    if extra is not None:
        extra(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if dequantized is not None:
        dequantized.load_state_dict(deq_state, strict=False)
        if cfg.tie_word_embeddings:
            dequantized.tie_weights()
        dequantized.eval()
    return GGUFModel(Path(path), model, dequantized, tok)


def sentencepiece_vocab() -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style BPE vocabulary as llama.cpp stores it: <unk>, <s>, </s>, the 256 byte tokens,
    then pieces ("▁" for a space) scored by merge order, with no merges listed."""
    from tokenizers import SentencePieceBPETokenizer

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(CORPUS, vocab_size=300, show_progress=False, special_tokens=[])
    pieces = [t for t, _ in sorted(sp.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    return tokens, scores, types


def write_sentencepiece_gguf(path: Path, add_space_prefix: bool = True) -> Path:
    """A tiny Llama whose tokenizer is tokenizer.ggml.model "llama" (SentencePiece BPE, byte fallback)."""
    import gguf

    tokens, scores, types = sentencepiece_vocab()
    model = build_hf_model("llama", 0, vocab_size=len(tokens), **HF_OVERRIDES["llama"])
    cfg = model.config
    w = gguf.GGUFWriter(path, "llama")
    _write_hyperparameters(w, cfg)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_space_prefix(add_space_prefix)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        data = t.float().numpy()
        if ".q_proj." in name or ".k_proj." in name:
            data = permute(data, cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads)
        w.add_tensor(gguf_name(name), np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
