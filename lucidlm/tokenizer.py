"""The checkpoint's tokenizer: ``tokenizer.json`` (the Hugging Face ``tokenizers`` format) plus the
special tokens named in ``tokenizer_config.json``.

Only the fast-tokenizer file is read (no sentencepiece ``.model`` pickles, no Python code from the
checkpoint); it holds the normaliser, pre-tokeniser, model and post-processor (which adds BOS
where the model family expects it), so encoding matches transformers' fast tokenizers.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from lucidlm.atomic_io import atomic_write
from lucidlm.chat_template import SPECIAL_TOKEN_KEYS, render_chat_template
from lucidlm.jsonl import write_json

TOKENIZER_FILE, CONFIG_FILE, TEMPLATE_FILE = "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"


class Tokenizer:
    """``template_file``: where the chat template came from, named by its errors."""

    def __init__(self, tokenizer: HFTokenizer, config: dict | None = None, template_file: str | None = None) -> None:
        self.backend = tokenizer
        self.config = config or {}
        self.chat_template: str | None = self.config.get("chat_template")
        self.template_file = template_file

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer | None:
        """The tokenizer of a checkpoint directory, or None when it ships no tokenizer.json. Every file is
        read through checkpoint/files.py (inside the directory, regular files, bounded JSON)."""
        from lucidlm.checkpoint.errors import CheckpointError
        from lucidlm.checkpoint.files import MAX_TEMPLATE_BYTES, MAX_TOKENIZER_BYTES, has_file, read_json, read_text

        directory = Path(directory)
        if not has_file(directory, TOKENIZER_FILE):
            return None
        try:
            backend = HFTokenizer.from_str(read_text(directory, TOKENIZER_FILE, MAX_TOKENIZER_BYTES))
        except CheckpointError:
            raise
        except Exception as e:  # the tokenizers library raises a generic Exception on bad files
            raise CheckpointError(f"{directory / TOKENIZER_FILE}: cannot read tokenizer ({e})") from e
        config = read_json(directory, CONFIG_FILE) if has_file(directory, CONFIG_FILE) else {}
        _check_config(config, directory / CONFIG_FILE)
        template_file = directory / CONFIG_FILE if "chat_template" in config else None
        if "chat_template" not in config and has_file(directory, TEMPLATE_FILE):  # transformers 5 stores it apart
            config["chat_template"] = read_text(directory, TEMPLATE_FILE, MAX_TEMPLATE_BYTES)
            template_file = directory / TEMPLATE_FILE
        return cls(backend, config, str(template_file) if template_file else None)

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
    def mask_token_id(self) -> int | None:
        """[MASK] of a masked-LM tokenizer (train/masked_lm.py)."""
        return self._special_id("mask_token")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def max_token_id(self) -> int:
        """The largest id ``encode`` can produce, added tokens included (ids need not be dense)."""
        return max(self.backend.get_vocab(with_added_tokens=True).values(), default=-1)

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
                                    special_tokens=special, template_file=self.template_file, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def save(self, directory: str | Path) -> None:
        """tokenizer.json + tokenizer_config.json, each written atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_write(directory / "tokenizer.json") as tmp:
            self.backend.save(str(tmp))
        write_json(directory / "tokenizer_config.json", self.config, sort_keys=False)


def pad_id(tokenizer: Tokenizer | None) -> int:
    """The id that fills padded positions: the tokenizer's pad token when it names one, else 0.

    The one rule for the whole package (engine, probe and SFT batches alike). Padded positions are masked out of
    attention and carry no label, so the id only has to be a valid row of the embedding: 0 always is, whatever
    the vocabulary, while the older SFT fallback, the EOS id, may be None (no EOS token) and reads as if the
    sequence had ended to anyone inspecting a batch."""
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return 0


def _check_config(config: dict, path: Path) -> None:
    """The fields of tokenizer_config.json that are read: special tokens and the chat template."""
    from lucidlm.checkpoint.errors import CheckpointError

    for key in SPECIAL_TOKEN_KEYS:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if value is not None and not isinstance(value, str):
            raise CheckpointError(f"{path}: {key} must be a token string (or {{'content': token}}), "
                                  f"got {type(value).__name__}")
    template = config.get("chat_template")
    named = isinstance(template, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                               and isinstance(t.get("template"), str) for t in template)
    if template is not None and not isinstance(template, str) and not named:
        raise CheckpointError(f"{path}: chat_template must be a string or a list of {{'name', 'template'}} "
                              f"entries, got {type(template).__name__}")


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
