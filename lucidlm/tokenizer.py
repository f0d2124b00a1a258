"""The checkpoint's tokenizer: ``tokenizer.json`` (the Hugging Face ``tokenizers`` format) plus the
special tokens named in ``tokenizer_config.json``.

Only the fast-tokenizer file is read (no sentencepiece ``.model`` pickles, no Python code from the
checkpoint); it holds the normaliser, pre-tokeniser, model and post-processor (which adds BOS
where the model family expects it), so encoding matches transformers' fast tokenizers.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from lucidlm.chat_template import SPECIAL_TOKEN_KEYS, render_chat_template


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, config: dict | None = None) -> None:
        self.backend = tokenizer
        self.config = config or {}
        self.chat_template: str | None = self.config.get("chat_template")

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer | None:
        """The tokenizer of a checkpoint directory, or None when it ships no tokenizer.json."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.exists():
            return None
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a generic Exception on bad files
            raise ValueError(f"{path}: cannot read tokenizer ({e})") from e
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        template_path = directory / "chat_template.jinja"  # transformers 5 may store it separately
        if "chat_template" not in config and template_path.exists():
            config["chat_template"] = template_path.read_text()
        return cls(backend, config)

    # --- special tokens -------------------------------------------------------------------
    def _special(self, key: str) -> str | None:
        value = self.config.get(key)
        if isinstance(value, dict):  # older files store {"content": "<s>", ...}
            value = value.get("content")
        return value

    def _special_id(self, key: str) -> int | None:
        token = self._special(key)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    # --- text <-> ids ---------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # --- chat ---------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False,
                            **kwargs) -> str | list[int]:
        """The prompt for ``messages`` rendered with the checkpoint's chat template, as transformers renders it
        (``tools=``, ``documents=`` and any other keyword, e.g. ``enable_thinking=False``, reach the template).
        With ``tokenize=True``, its token ids, encoded without adding special tokens: the template writes BOS."""
        special = {key: token for key in SPECIAL_TOKEN_KEYS if (token := self._special(key)) is not None}
        text = render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    special_tokens=special, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def save(self, directory: str | Path) -> None:
        """tokenizer.json + tokenizer_config.json, each written atomically."""
        from lucidlm.checkpoint.safetensors_io import atomic_write

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_write(directory / "tokenizer.json") as tmp:
            self.backend.save(str(tmp))
        with atomic_write(directory / "tokenizer_config.json") as tmp:
            tmp.write_text(json.dumps(self.config, indent=2) + "\n")


def byte_tokenizer(special_tokens: tuple[str, ...] = ("<|bos|>", "<|eos|>", "<|pad|>")) -> Tokenizer:
    """A byte-level tokenizer with one token per byte (GPT-2's byte alphabet) and no merges:
    any text round-trips exactly. Used for random demo models; real models ship their own."""
    from tokenizers import decoders, models, pre_tokenizers, processors

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(special_tokens))
    bos, eos, pad = special_tokens[:3]  # any further ones (chat turn markers) are plain special tokens
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, backend.token_to_id(bos))]
    )
    config = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "model_max_length": 1 << 30,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    return Tokenizer(backend, config)
