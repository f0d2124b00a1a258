"""BERT's masking, measured on a large batch: 15% of the ordinary tokens chosen, uniformly over positions; of those
80% [MASK], 10% a random ordinary token, 10% unchanged; special tokens never chosen; labels = the original ids
exactly at the chosen positions; the same seed masks the same way (and a resumed stream continues it)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lucidlm.tokenizer import byte_tokenizer
from lucidlm.train.masked_lm import (
    MaskedBatches,
    MaskedLMObjective,
    MaskingConfig,
    TokenMasker,
    batch_generator,
)
from lucidlm.train.objectives import IGNORE_INDEX
from lucidlm.train.pretrain_data import PackedTextDataset
from lucidlm.train.tokenizer_training import MLM_SPECIAL_TOKENS, MLM_TOKEN_ROLES, train_bpe_tokenizer

VOCAB, CLS, SEP, PAD, MASK = 1000, 0, 1, 2, 3
ROWS, LEN = 1024, 256


def sample_batch() -> torch.Tensor:
    """Rows of ordinary ids opening with [CLS], a [SEP] in the middle and at the end, some right-padded."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (ROWS, LEN), generator=g)
    ids[:, 0] = CLS
    ids[:, LEN // 2] = SEP
    lengths = torch.randint(LEN // 2 + 2, LEN + 1, (ROWS,), generator=g)
    cols = torch.arange(LEN)[None]
    ids = ids.masked_fill(cols == (lengths - 1)[:, None], SEP).masked_fill(cols >= lengths[:, None], PAD)
    return ids


@pytest.fixture(scope="module")
def masked():
    ids = sample_batch()
    masker = TokenMasker(VOCAB, MASK, [CLS, SEP, PAD])
    out, labels = masker(ids, batch_generator(7, 0))
    return ids, out, labels


def test_fifteen_percent_of_each_rows_ordinary_tokens_are_chosen_uniformly(masked):
    ids, _, labels = masked
    chosen = labels != IGNORE_INDEX
    ordinary = ids >= 4
    n = ordinary.sum(1)
    expected = torch.round(n * 0.15).clamp(min=1).long()
    assert torch.equal(chosen.sum(1), expected)  # BERT's round(0.15 · n) per row, exactly
    assert not (chosen & ~ordinary).any()  # [CLS], [SEP], padding: never
    # uniform over positions: the first and second halves of the rows are each chosen at 15%
    half = LEN // 2
    for part in (slice(1, half), slice(half + 1, None)):
        rate = chosen[:, part].sum() / ordinary[:, part].sum()
        assert abs(float(rate) - 0.15) < 0.005, rate


def test_of_the_chosen_80_percent_are_masked_10_random_10_unchanged(masked):
    ids, out, labels = masked
    chosen = labels != IGNORE_INDEX
    total = int(chosen.sum())
    assert total > 28000  # a tolerance of 0.01 is >= 4 standard deviations of every share
    as_mask = (chosen & (out == MASK)).sum() / total
    unchanged = (chosen & (out == ids)).sum() / total
    replaced = chosen & (out != ids) & (out != MASK)
    # a random draw equals the original 1 in 996 times: it then counts as unchanged
    assert abs(float(as_mask) - 0.8) < 0.01
    assert abs(float(replaced.sum() / total) - 0.1 * (1 - 1 / 996)) < 0.01
    assert abs(float(unchanged) - (0.1 + 0.1 / 996)) < 0.01
    assert bool((out[replaced] >= 4).all())  # random replacements are ordinary tokens, never special
    assert len(torch.unique(out[replaced])) > 900  # drawn across the whole ordinary vocabulary
    assert torch.equal(out[~chosen], ids[~chosen])  # nothing else is touched


def test_labels_are_the_original_ids_at_the_chosen_positions_only(masked):
    ids, out, labels = masked
    chosen = out != ids
    assert torch.equal(labels[chosen], ids[chosen])  # every changed position is a labelled one
    kept = labels != IGNORE_INDEX
    assert torch.equal(labels[kept], ids[kept])
    assert bool((labels[~kept] == IGNORE_INDEX).all())


def test_the_same_seed_masks_the_same_way():
    ids = sample_batch()[:64]
    masker = TokenMasker(VOCAB, MASK, [CLS, SEP, PAD])
    a, b = masker(ids, batch_generator(3, 5)), masker(ids, batch_generator(3, 5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for other in (batch_generator(4, 5), batch_generator(3, 6)):
        assert not torch.equal(masker(ids, other)[1], a[1])


def test_masked_batches_resume_where_they_stopped(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(f"document number {i} about the town baker" for i in range(60)))
    tokenizer = byte_tokenizer(MLM_SPECIAL_TOKENS)
    tokenizer.config.update(MLM_TOKEN_ROLES)
    masker = TokenMasker.from_tokenizer(tokenizer)
    assert masker.mask_id == 259 and bool(masker.is_special[256:].all()) and not masker.is_special[:256].any()

    def stream():
        return MaskedBatches(PackedTextDataset([tmp_path / "a.txt"], tokenizer, 32, 4), masker, seed=1)

    first = stream()
    it = iter(first)
    next(it)
    state = first.state_dict()
    expected = [next(it) for _ in range(2)]
    resumed = stream()
    resumed.load_state_dict(state)
    got = list(zip(range(2), resumed))
    for (_, g), e in zip(got, expected):
        assert torch.equal(g["input_ids"], e["input_ids"]) and torch.equal(g["labels"], e["labels"])


def test_a_trained_mlm_tokenizer_has_the_special_tokens_and_they_are_never_masked(tmp_path):
    from transformers import AutoTokenizer

    (tmp_path / "t.txt").write_text("\n\n".join(f"the baker bakes bread number {i}" for i in range(200)))
    tok = train_bpe_tokenizer([tmp_path / "t.txt"], 300, tmp_path / "tok", MLM_SPECIAL_TOKENS, chat_template=None,
                              token_roles=MLM_TOKEN_ROLES)
    theirs = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert (theirs.mask_token, theirs.cls_token, theirs.sep_token) == ("[MASK]", "[CLS]", "[SEP]")
    assert tok.mask_token_id == theirs.mask_token_id
    masker = TokenMasker.from_tokenizer(tok)
    ids = torch.tensor([tok.encode("[CLS] the baker [SEP] bakes bread [SEP]", add_special_tokens=False)] * 200)
    _, labels = masker(ids, batch_generator(0, 0))
    specials = torch.isin(ids, torch.tensor([tok.bos_token_id, tok.eos_token_id]))
    assert specials.any() and bool((labels[specials] == IGNORE_INDEX).all())


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="mask_fraction \\+ random_fraction must be <= 1"):
        MaskingConfig(mask_fraction=0.9, random_fraction=0.2)
    with pytest.raises(ValueError, match="mask_prob must be in"):
        MaskingConfig(mask_prob=0.0)
    with pytest.raises(ValueError, match="no mask token"):
        TokenMasker.from_tokenizer(byte_tokenizer())


def test_objective_is_the_cross_entropy_at_the_chosen_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.tensor([[IGNORE_INDEX, 3, IGNORE_INDEX, IGNORE_INDEX, 6], [1, IGNORE_INDEX] * 2 + [IGNORE_INDEX]])
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "labels": labels}
    parts = MaskedLMObjective()(lambda ids, **_: logits, batch)
    expected = sum(-F.log_softmax(logits[b, t], -1)[labels[b, t]] for b in range(2) for t in range(5)
                   if labels[b, t] != IGNORE_INDEX)
    assert parts.tokens == MaskedLMObjective().count(batch) == 4
    torch.testing.assert_close(parts.loss_sum, expected)
