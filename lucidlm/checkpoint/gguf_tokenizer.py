"""A ``Tokenizer`` from a GGUF file's tokenizer metadata, built with the ``tokenizers`` library.

GGUF stores the vocabulary (``tokenizer.ggml.tokens``), each token's type (1 normal, 2 unknown,
3 control, 4 user-defined, 6 byte), the BPE merges, the special ids and the chat template, but
not how text is split before BPE: that is the name in ``tokenizer.ggml.pre``, which llama.cpp maps
to its regexes. The same regexes are used here, so tokens match llama.cpp and the model's original
tokenizer.json (e.g. SmolLM's "smollm" splits every digit apart before GPT-2's split). An unknown
name is refused rather than guessed: a wrong split gives valid but different tokens.

Supported models: "gpt2" (byte-level BPE with merges) and "llama" (SentencePiece BPE with byte
fallback, merges recovered from the scores when the file has none; not yet Gemma's variant of it).
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from ..tokenizer import Tokenizer
from .errors import CheckpointError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def _byte_level(split: str | None, gpt2_regex: bool = False) -> pre_tokenizers.PreTokenizer:
    """An optional first split, then bytes -> GPT-2's alphabet (with GPT-2's own regex if asked)."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=gpt2_regex)
    if split is None:
        return byte_level
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])


# tokenizer.ggml.pre -> how llama.cpp splits text before byte-level BPE
PRE_TOKENIZERS = {
    "default": lambda: _byte_level(None, gpt2_regex=True), "gpt2": lambda: _byte_level(None, gpt2_regex=True),
    # every digit apart, then GPT-2's regex
    "smollm": lambda: _byte_level(r"\p{N}", gpt2_regex=True), "starcoder": lambda: _byte_level(r"\p{N}", True),
    "refact": lambda: _byte_level(r"\p{N}", gpt2_regex=True),
    "llama-bpe": lambda: _byte_level(_LLAMA3), "llama3": lambda: _byte_level(_LLAMA3),
    "smaug-bpe": lambda: _byte_level(_LLAMA3),
    "qwen2": lambda: _byte_level(_QWEN2), "deepseek-r1-qwen": lambda: _byte_level(_QWEN2),
}


def _meta(meta: dict, key: str, default: Any = None) -> Any:
    return meta.get(f"tokenizer.ggml.{key}", default)


def _token(meta: dict, key: str) -> str | None:
    i = _meta(meta, f"{key}_token_id")
    tokens = meta["tokenizer.ggml.tokens"]
    return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None


def _gpt2(meta: dict, source: str) -> HFTokenizer:
    pre = _meta(meta, "pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(f"{source}: GGUF pre-tokenizer {pre!r} is not supported; supported: "
                              f"{', '.join(sorted(PRE_TOKENIZERS))}")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in _meta(meta, "merges", [])]
    backend = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                     ignore_merges=False))
    backend.pre_tokenizer = PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """The merges a SentencePiece BPE vocabulary implies: every split of a piece into two pieces, ranked
    by the merged piece's score (higher first), ties by longer left then right part, as transformers ranks them."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, USER_DEFINED)}
    found: list[tuple[str, str, float]] = []
    for token, i in vocab.items():
        pairs = [(token[:cut], token[cut:]) for cut in range(1, len(token))]
        pairs = [(left, right) for left, right in pairs if left in vocab and right in vocab]
        pairs.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        found += [(left, right, scores[i]) for left, right in pairs]
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)  # stable: ties keep vocabulary order
    return [(left, right) for left, right, _ in found]


def _llama(meta: dict, source: str) -> HFTokenizer:
    tokens = meta["tokenizer.ggml.tokens"]
    types = _meta(meta, "token_type") or [NORMAL] * len(tokens)
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        scores = _meta(meta, "scores") or [0.0] * len(tokens)
        merges = _sentencepiece_merges(tokens, scores, types)
    unk = _token(meta, "unknown")
    backend = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token=unk,
                                     byte_fallback=True, fuse_unk=True, ignore_merges=False))
    prefix = bool(_meta(meta, "add_space_prefix", True))  # SentencePiece's "dummy prefix": "Hi" is "▁Hi"
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                     split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return backend


BUILDERS = {"gpt2": _gpt2, "llama": _llama}


def _add_special_tokens(backend: HFTokenizer, meta: dict) -> None:
    """Control tokens are special (skipped by skip_special_tokens); user-defined ones are matched whole
    in text as llama.cpp does, but decode as text. Both keep their vocabulary ids."""
    tokens = meta["tokenizer.ggml.tokens"]
    types = _meta(meta, "token_type") or []
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED]
    backend.add_special_tokens(special)
    backend.add_tokens(user)


def _post_processor(backend: HFTokenizer, bos: str | None, eos: str | None, add_bos: bool,
                    add_eos: bool, byte_level: bool) -> None:
    steps = [processors.ByteLevel(trim_offsets=False)] if byte_level else []
    around = [t for t, add in ((bos, add_bos), (eos, add_eos)) if add and t]
    if around:
        first = ([bos] if add_bos and bos else []), ([eos] if add_eos and eos else [])
        single = [*first[0], "$A", *first[1]]
        pair = single + [f"{t}:1" for t in first[0]] + ["$B:1"] + [f"{t}:1" for t in first[1]]
        steps.append(processors.TemplateProcessing(single=single, pair=pair,
                                                   special_tokens=[(t, backend.token_to_id(t)) for t in set(around)]))
    if steps:
        backend.post_processor = steps[0] if len(steps) == 1 else processors.Sequence(steps)


def gguf_tokenizer(meta: dict, source: str = "GGUF file") -> Tokenizer | None:
    """The tokenizer a GGUF file's metadata describes (None when it has no vocabulary)."""
    if "tokenizer.ggml.tokens" not in meta:
        return None
    kind = _meta(meta, "model")
    if kind not in BUILDERS:
        raise CheckpointError(f"{source}: GGUF tokenizer model {kind!r} is not supported; supported: "
                              f"{', '.join(sorted(BUILDERS))}")
    if kind == "llama" and str(meta.get("general.architecture", "")).startswith("gemma"):
        # Gemma files spell multi-space tokens with real spaces and order merges by position, not score
        raise CheckpointError(f"{source}: Gemma's SentencePiece vocabulary in GGUF is not supported yet (its "
                              "space tokens and merge order differ); load the Hugging Face checkpoint instead")
    backend = BUILDERS[kind](meta, source)
    _add_special_tokens(backend, meta)
    bos, eos = _token(meta, "bos"), _token(meta, "eos")
    # llama.cpp adds BOS to SentencePiece vocabularies that do not say otherwise
    add_bos = bool(_meta(meta, "add_bos_token", kind == "llama"))
    add_eos = bool(_meta(meta, "add_eos_token", False))
    _post_processor(backend, bos, eos, add_bos, add_eos, byte_level=kind == "gpt2")
    config: dict = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos, "add_eos_token": add_eos,
                    "model_max_length": 1 << 30}
    for key, field in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        if (token := _token(meta, field)) is not None:
            config[key] = token
    template_file = None
    if isinstance(meta.get("tokenizer.chat_template"), str):
        config["chat_template"] = meta["tokenizer.chat_template"]
        template_file = f"{source} (tokenizer.chat_template)"
    return Tokenizer(backend, config, template_file)
