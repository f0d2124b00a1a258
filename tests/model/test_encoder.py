"""The encoder-only masked LM: its logits equal transformers' BertForMaskedLM on a padded batch with token
types (checkpoint loaded through lucidlm's loader), it sees both ways, and padding changes nothing real."""

from __future__ import annotations

import logging

import pytest
import torch

from lucidlm.checkpoint.encoder_loader import load_encoder_model
from lucidlm.model.encoder import EncoderConfig, MaskedLM, encoder_preset

BERT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, type_vocab_size=2)
SMALL = dict(vocab_size=100, d_model=32, n_heads=2, n_layers=2, ffn_dim=64, max_len=64, dropout=0.0)


def hf_bert(**overrides):
    """A random BertForMaskedLM whose every weight (norms, biases too) is random: a mapping mistake cannot hide
    behind an init of ones or zeros."""
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(transformers.BertConfig(**{**BERT, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def padded_batch() -> dict[str, torch.Tensor]:
    """Three rows, right-padded to 12 (BERT's convention): full, 8 real tokens, 3 real tokens; two segments."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, BERT["vocab_size"], (3, 12), generator=g)
    attention_mask = torch.ones(3, 12, dtype=torch.long)
    attention_mask[1, 8:] = 0
    attention_mask[2, 3:] = 0
    ids = ids.masked_fill(attention_mask == 0, 0)  # [PAD] = 0
    token_type_ids = torch.zeros(3, 12, dtype=torch.long)
    token_type_ids[0, 5:] = 1
    token_type_ids[1, 4:8] = 1
    return dict(input_ids=ids, attention_mask=attention_mask, token_type_ids=token_type_ids)


@pytest.mark.parametrize("tied", [True, False])
def test_logits_equal_transformers_bert_for_masked_lm(tmp_path, tied):
    theirs = hf_bert(tie_word_embeddings=tied)
    theirs.save_pretrained(tmp_path)
    loaded = load_encoder_model(tmp_path)
    assert loaded.config.tie_embeddings is tied and loaded.config.norm_eps == 1e-12
    batch = padded_batch()
    with torch.no_grad():
        expected = theirs(**batch).logits
        got = loaded.model(**batch)
    assert got.shape == expected.shape == (3, 12, BERT["vocab_size"])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_pretraining_checkpoint_loads_without_its_pooler_and_next_sentence_head(tmp_path):
    import transformers

    torch.manual_seed(0)
    theirs = transformers.BertForPreTraining(transformers.BertConfig(**BERT)).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.2)
    theirs.save_pretrained(tmp_path)
    batch = padded_batch()
    with torch.no_grad():
        expected = theirs(**batch).prediction_logits
        got = load_encoder_model(tmp_path).model(**batch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def small_model(**overrides) -> MaskedLM:
    torch.manual_seed(0)
    return MaskedLM(EncoderConfig(**{**SMALL, **overrides})).eval()


def test_every_position_sees_later_tokens_too():
    model = small_model()
    ids = torch.randint(4, 100, (1, 10))
    changed = ids.clone()
    changed[0, 7] = (ids[0, 7] + 1) % 100
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert not torch.allclose(a[0, 2], b[0, 2], atol=1e-4)  # position 2 depends on position 7
    assert not torch.allclose(a[0, 0], b[0, 0], atol=1e-4)


def test_padding_changes_nothing_real():
    model = small_model()
    ids = torch.randint(4, 100, (1, 6))
    alone = model(ids)
    padded = torch.cat([ids, torch.randint(4, 100, (1, 5))], 1)  # junk in the padded slots
    mask = torch.tensor([[1] * 6 + [0] * 5])
    other_junk = padded.clone()
    other_junk[0, 6:] = torch.randint(4, 100, (5,))
    with torch.no_grad():
        a, b = model(padded, mask), model(other_junk, mask)
        alone = model(ids)
    torch.testing.assert_close(a[:, :6], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b[:, :6], alone, atol=1e-5, rtol=1e-5)


def test_token_types_are_used():
    model = small_model()
    ids = torch.randint(4, 100, (1, 8))
    second = torch.tensor([[0] * 4 + [1] * 4])
    with torch.no_grad():
        assert not torch.allclose(model(ids), model(ids, token_type_ids=second), atol=1e-4)


def test_bad_configs_and_inputs_are_named():
    with pytest.raises(ValueError, match="multiple of n_heads"):
        EncoderConfig(**{**SMALL, "n_heads": 5})
    with pytest.raises(ValueError, match="activation"):
        EncoderConfig(**{**SMALL, "activation": "tanh"})
    with pytest.raises(ValueError, match="unknown EncoderConfig preset"):
        encoder_preset("bert-huge")
    model = small_model()
    with pytest.raises(ValueError, match="exceeds the encoder's 64 learned positions"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))


def test_bert_base_has_the_papers_size():
    with torch.device("meta"):
        n = MaskedLM(encoder_preset("bert-base")).num_parameters()
    assert 109e6 < n < 111e6  # Devlin et al. 2019: 110 M
