"""The masked-LM objective (BERT, Devlin et al. 2019 §3.1 "Task #1: Masked LM").

In every sequence 15% of the ordinary (non-special) tokens are chosen, uniformly without replacement, as
BERT's create_pretraining_data.py chooses them: round(0.15 · n) of a row's n candidates, at least one. Each
chosen token is then

    80%: replaced by [MASK]       10%: replaced by a random token       10%: left as it is

and the model is trained to predict the original token at the chosen positions only: ``labels`` hold the
original id there and IGNORE_INDEX everywhere else. The random and unchanged cases keep the model from
learning that only [MASK] positions matter (the fine-tuning inputs have no [MASK]). Random replacements
are drawn from the ordinary tokens, so a special token ([SEP], [MASK], ...) is never planted in the text.

Masks are drawn from a generator seeded by (seed, batch number): the same seed masks the same batches the
same way, and a resumed run (``MaskedBatches.state_dict``) masks the batches that follow exactly as an
uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..tokenizer import Tokenizer
from .objectives import IGNORE_INDEX, LossParts


@dataclass
class MaskingConfig:
    mask_prob: float = 0.15  # fraction of a row's ordinary tokens that are chosen
    mask_fraction: float = 0.8  # of the chosen: replaced by [MASK]
    random_fraction: float = 0.1  # of the chosen: replaced by a random token (the rest stay unchanged)

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_prob <= 1.0:
            raise ValueError(f"MaskingConfig.mask_prob must be in (0, 1], got {self.mask_prob}")
        for name in ("mask_fraction", "random_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"MaskingConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.mask_fraction + self.random_fraction > 1.0:
            raise ValueError(f"MaskingConfig.mask_fraction + random_fraction must be <= 1, got "
                             f"{self.mask_fraction} + {self.random_fraction}")


class TokenMasker:
    """Masks batches of token ids for one vocabulary: which ids are special, which id is [MASK]."""

    def __init__(self, vocab_size: int, mask_id: int, special_ids: Sequence[int],
                 config: MaskingConfig | None = None) -> None:
        if not 0 <= mask_id < vocab_size:
            raise ValueError(f"mask id {mask_id} is outside the vocabulary (vocab_size={vocab_size})")
        self.config = config or MaskingConfig()
        self.mask_id = mask_id
        special = torch.zeros(vocab_size, dtype=torch.bool)
        special[torch.tensor(sorted({*special_ids, mask_id}), dtype=torch.long)] = True
        self.is_special = special  # (vocab,) True for ids that are never chosen nor drawn
        self.ordinary = (~special).nonzero().flatten()  # the ids a random replacement is drawn from
        if len(self.ordinary) == 0:
            raise ValueError("every token of the vocabulary is special: nothing to mask")

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, config: MaskingConfig | None = None) -> TokenMasker:
        """The tokenizer's mask token; its special tokens ([CLS], [SEP], padding, ...) are never masked."""
        if tokenizer.mask_token_id is None:
            raise ValueError("the tokenizer has no mask token (tokenizer_config.json mask_token): masked-LM "
                             "training needs one; train a tokenizer with `lucidlm tokenizer train --mlm`")
        special = [i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special]
        return cls(tokenizer.max_token_id() + 1, tokenizer.mask_token_id, special, config)

    def choose(self, input_ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(batch, seq) bool: round(mask_prob · n) of each row's n ordinary tokens (at least one), uniformly."""
        candidate = ~self.is_special.to(input_ids.device)[input_ids]  # (b, s)
        n = candidate.sum(1)  # (b,)
        k = torch.where(n > 0, torch.round(n * self.config.mask_prob).clamp(min=1).long(), 0)  # (b,)
        scores = _uniform(input_ids.shape, generator, input_ids.device).masked_fill(~candidate, 2.0)
        rank = scores.argsort(1).argsort(1)  # (b, s): 0 for the lowest score; specials rank last
        return rank < k[:, None]

    def __call__(self, input_ids: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked input ids, labels), both (batch, seq): labels = the original id at the chosen positions,
        IGNORE_INDEX elsewhere."""
        cfg = self.config
        chosen = self.choose(input_ids, generator)
        u = _uniform(input_ids.shape, generator, input_ids.device)  # one draw per position decides its case
        to_mask = chosen & (u < cfg.mask_fraction)
        to_random = chosen & (u >= cfg.mask_fraction) & (u < cfg.mask_fraction + cfg.random_fraction)
        pick = torch.randint(len(self.ordinary), input_ids.shape, generator=generator, device=generator.device)
        random_ids = self.ordinary[pick].to(input_ids.device)
        masked = input_ids.masked_fill(to_mask, self.mask_id)
        masked = torch.where(to_random, random_ids, masked)
        labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)
        return masked, labels


def _uniform(shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def batch_generator(seed: int, batch: int) -> torch.Generator:
    """The generator that masks batch number ``batch`` of a run seeded ``seed``: one stream per pair."""
    return torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + batch) % (1 << 63))


class MaskedBatches:
    """Batches of another dataset (``input_ids`` + ``attention_mask``, e.g. packed text) with ``input_ids``
    masked and ``labels`` set for the masked-LM loss. The data position is the inner dataset's plus the
    number of batches masked so far."""

    def __init__(self, batches: Iterable[dict[str, torch.Tensor]], masker: TokenMasker, seed: int) -> None:
        self.batches, self.masker, self.seed = batches, masker, seed
        self.done = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.batches:
            ids, labels = self.masker(batch["input_ids"], batch_generator(self.seed, self.done))
            self.done += 1
            yield {**batch, "input_ids": ids, "labels": labels}

    def state_dict(self) -> dict:
        inner = self.batches.state_dict() if hasattr(self.batches, "state_dict") else None
        return {"batches": self.done, "data": inner}

    def load_state_dict(self, state: dict) -> None:
        self.done = state["batches"]
        if state["data"] is not None:
            self.batches.load_state_dict(state["data"])


class MaskedLMObjective:
    """Cross entropy of the original token at the chosen positions (no shift: an encoder predicts the token
    at its own position), summed, with the number of chosen positions; also their accuracy."""

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossParts:
        logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                       token_type_ids=batch.get("token_type_ids"))  # (b, s, vocab)
        labels = batch["labels"]
        chosen = labels != IGNORE_INDEX
        picked = logits[chosen].float()  # (n_chosen, vocab)
        loss = F.cross_entropy(picked, labels[chosen], reduction="sum")
        n = int(chosen.sum())
        accuracy = float((picked.argmax(-1) == labels[chosen]).float().mean()) if n else 0.0
        return LossParts(loss, n, metrics={"mlm_accuracy": accuracy})
