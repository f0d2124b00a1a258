"""bert checkpoints: lucidlm's saved encoder is transformers' BertForMaskedLM again (round trip through both),
``lucidlm.load`` refuses an encoder naming ``load_encoder``, and damaged checkpoints are named before any read."""

from __future__ import annotations

import json

import pytest
import torch

import lucidlm
from lucidlm.checkpoint.encoder_loader import load_encoder_model, save_encoder_model
from lucidlm.checkpoint.errors import CheckpointError
from lucidlm.model.encoder import EncoderConfig, MaskedLM
from lucidlm.random_checkpoint import build_random_checkpoint

SMALL = dict(vocab_size=90, d_model=32, n_heads=4, n_layers=2, ffn_dim=48, max_len=40, dropout=0.0)


def random_encoder(**overrides) -> MaskedLM:
    torch.manual_seed(0)
    model = MaskedLM(EncoderConfig(**{**SMALL, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_saved_encoder_is_transformers_bert_and_loads_back(tmp_path, tied):
    from transformers import BertForMaskedLM

    ours = random_encoder(tie_embeddings=tied)
    save_encoder_model(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    theirs = BertForMaskedLM.from_pretrained(tmp_path).eval()
    again = load_encoder_model(tmp_path).model
    ids = torch.randint(0, 90, (2, 9))
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    types = torch.tensor([[0] * 4 + [1] * 5, [0] * 9])
    with torch.no_grad():
        expected = ours(ids, mask, types)
        torch.testing.assert_close(theirs(input_ids=ids, attention_mask=mask, token_type_ids=types).logits, expected,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(again(ids, mask, types), expected, atol=0, rtol=0)


def test_load_encoder_gives_the_model_and_tokenizer_and_load_refuses_it(tmp_path):
    from lucidlm.tokenizer import byte_tokenizer

    ours = random_encoder(vocab_size=260)
    save_encoder_model(ours, tmp_path)
    byte_tokenizer(("[CLS]", "[SEP]", "[PAD]", "[MASK]")).save(tmp_path)
    enc = lucidlm.load_encoder(tmp_path, device="cpu")
    assert enc.tokenizer.decode(enc.encode("hi")) == "[CLS]hi"
    out = enc.save(tmp_path / "copy")
    assert (out / "tokenizer.json").exists()
    torch.testing.assert_close(lucidlm.load_encoder(out, device="cpu").model.state_dict(), ours.state_dict())
    with pytest.raises(CheckpointError, match=r"encoder-only masked LM, not a causal LM: load it with "
                                              r"lucidlm\.load_encoder"):
        lucidlm.load(tmp_path)


def test_errors_name_the_problem(tmp_path):
    causal = build_random_checkpoint(tmp_path / "llama")
    with pytest.raises(CheckpointError, match="not an encoder lucidlm loads; supported encoder model types: bert"):
        load_encoder_model(causal)
    save_encoder_model(random_encoder(), tmp_path / "bert")
    config = json.loads((tmp_path / "bert" / "config.json").read_text())
    (tmp_path / "bert" / "config.json").write_text(json.dumps({**config, "is_decoder": True}))
    with pytest.raises(CheckpointError, match="is_decoder=True is not supported"):
        load_encoder_model(tmp_path / "bert")
    (tmp_path / "bert" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match=r"missing tensors \['bert.encoder.layer.2"):
        load_encoder_model(tmp_path / "bert")
    (tmp_path / "bert" / "config.json").write_text(json.dumps({**config, "hidden_size": 30}))
    with pytest.raises(CheckpointError, match="multiple of n_heads"):
        load_encoder_model(tmp_path / "bert")
