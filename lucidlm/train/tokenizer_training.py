"""Train a byte-level BPE tokenizer (GPT-2 style) on text files with the ``tokenizers`` library.

Text is split into bytes (so every string is encodable, no unknown token), pre-split on GPT-2's
word/space pattern, and BPE merges the most frequent adjacent pairs until ``vocab_size`` tokens exist
(Sennrich et al. 2016; Radford et al. 2019). Special tokens (BOS, EOS, padding, chat turn markers) are
whole tokens never split or merged. The result is saved as tokenizer.json + tokenizer_config.json —
the files ``AutoTokenizer.from_pretrained`` reads — with a ChatML chat template.
"""

from __future__ import annotations

from pathlib import Path

from ..tokenizer import Tokenizer
from .pretrain_data import expand_files

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>")
# A masked LM's (BERT's names): [CLS] opens a sequence (BOS), [SEP] closes one (EOS, between packed documents),
# [MASK] stands in for the tokens to predict; no chat template (an encoder does not chat)
MLM_SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[PAD]", "[MASK]")
MLM_TOKEN_ROLES = {"cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def train_bpe_tokenizer(files: list[str | Path], vocab_size: int, out_dir: str | Path | None = None,
                        special_tokens: tuple[str, ...] = SPECIAL_TOKENS, chat_template: str | None = CHATML,
                        min_frequency: int = 2, model_max_length: int = 2048,
                        token_roles: dict[str, str] | None = None) -> Tokenizer:
    """special_tokens: BOS, EOS and padding first (in that order), then any others. token_roles: further
    tokenizer_config.json roles of special tokens (``MLM_TOKEN_ROLES``: cls_token, sep_token, mask_token)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    paths = expand_files(files)
    if len(special_tokens) < 3:
        raise ValueError("special_tokens needs at least BOS, EOS and padding tokens, in that order")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(special_tokens):
        raise ValueError(f"vocab_size {vocab_size} is below the byte alphabet ({len(alphabet)}) + "
                         f"{len(special_tokens)} special tokens")
    if all(p.stat().st_size == 0 for p in paths):
        raise ValueError(f"the corpus is empty: {[str(p) for p in paths]}")
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=list(special_tokens), initial_alphabet=alphabet)
    backend.train([str(p) for p in paths], trainer)
    bos, eos, pad = special_tokens[:3]
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "pad_token": pad,
              "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
              "additional_special_tokens": list(special_tokens[3:])}
    if chat_template is not None:
        config["chat_template"] = chat_template
    for role, token in (token_roles or {}).items():
        if token not in special_tokens:
            raise ValueError(f"{role} {token!r} is not one of the special tokens {list(special_tokens)}")
        config[role] = token
    tokenizer = Tokenizer(backend, config)
    if out_dir is not None:
        tokenizer.save(out_dir)
    return tokenizer
