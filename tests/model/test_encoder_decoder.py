"""The original Transformer: layers equal torch.nn's reference layers, masks hold, it learns to reverse digits."""

from __future__ import annotations

import tempfile

import pytest
import torch
from torch import nn

from lucidlm.model.encoder_decoder import (
    DecoderLayer,
    EncoderDecoder,
    EncoderDecoderConfig,
    EncoderLayer,
    paper_base_config,
)
from lucidlm.train.objectives import Seq2Seq
from lucidlm.train.trainer import TrainConfig, Trainer

CFG = EncoderDecoderConfig(vocab_size=13, d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, ffn_dim=64,
                           dropout=0.0, max_len=32)


def copy_attention(ours, theirs: nn.MultiheadAttention) -> None:
    d = ours.q_proj.in_features
    with torch.no_grad():
        for i, proj in enumerate((ours.q_proj, ours.k_proj, ours.v_proj)):
            proj.weight.copy_(theirs.in_proj_weight[i * d:(i + 1) * d])
            proj.bias.copy_(theirs.in_proj_bias[i * d:(i + 1) * d])
        ours.o_proj.weight.copy_(theirs.out_proj.weight)
        ours.o_proj.bias.copy_(theirs.out_proj.bias)


def copy_ffn_and_norms(ours, theirs, subs) -> None:
    with torch.no_grad():
        ours.ffn.up.weight.copy_(theirs.linear1.weight)
        ours.ffn.up.bias.copy_(theirs.linear1.bias)
        ours.ffn.down.weight.copy_(theirs.linear2.weight)
        ours.ffn.down.bias.copy_(theirs.linear2.bias)
        for sub, norm in zip(subs, (theirs.norm1, theirs.norm2, getattr(theirs, "norm3", None))):
            sub.norm.load_state_dict(norm.state_dict())


@pytest.mark.parametrize("norm_first", [False, True])
def test_layers_equal_torch_reference_layers(norm_first):
    torch.manual_seed(0)
    cfg = EncoderDecoderConfig(**{**CFG.__dict__, "norm_first": norm_first})
    x, mem = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    src_pad = torch.tensor([[False] * 7, [False] * 4 + [True] * 3])  # torch: True = padding
    keys = (~src_pad)[:, None, None, :]

    enc, ref = EncoderLayer(cfg).eval(), nn.TransformerEncoderLayer(32, 4, 64, 0.0, batch_first=True,
                                                                     norm_first=norm_first).eval()
    copy_attention(enc.self_attn, ref.self_attn)
    copy_ffn_and_norms(enc, ref, (enc.attn_sub, enc.ffn_sub))
    torch.testing.assert_close(enc(mem, keys), ref(mem, src_key_padding_mask=src_pad), rtol=1e-5, atol=1e-5)

    dec, ref = DecoderLayer(cfg).eval(), nn.TransformerDecoderLayer(32, 4, 64, 0.0, batch_first=True,
                                                                     norm_first=norm_first).eval()
    copy_attention(dec.self_attn, ref.self_attn)
    copy_attention(dec.cross_attn, ref.multihead_attn)
    copy_ffn_and_norms(dec, ref, (dec.self_sub, dec.cross_sub, dec.ffn_sub))
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    expected = ref(x, mem, tgt_mask=nn.Transformer.generate_square_subsequent_mask(5), memory_key_padding_mask=src_pad)
    torch.testing.assert_close(dec(x, mem, causal, keys), expected, rtol=1e-5, atol=1e-5)


def test_decoder_is_causal_and_source_padding_is_ignored():
    torch.manual_seed(0)
    model = EncoderDecoder(CFG).eval()
    src = torch.tensor([[5, 6, 7, 8, 0, 0]])
    tgt = torch.tensor([[1, 9, 10, 11, 12]])
    logits = model(src, tgt)
    changed = tgt.clone()
    changed[0, 3] = 4
    torch.testing.assert_close(model(src, changed)[:, :3], logits[:, :3])  # earlier positions never see later ones
    torch.testing.assert_close(model(src[:, :4], tgt), logits, rtol=1e-5, atol=1e-5)  # padding changes nothing


def test_paper_base_configuration_has_about_65m_parameters():
    with torch.device("meta"):
        model = EncoderDecoder(paper_base_config())
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 65e6) / 65e6 < 0.05  # Table 3: 65 M (ours: 63.1 M with the 37 k shared vocabulary)


PAD, BOS, EOS = 0, 1, 2


def reversal_batch(seed: int, n: int) -> dict[str, torch.Tensor]:
    """Digit strings (tokens 3..12) of 3 to 10 digits; the target is the string reversed."""
    g = torch.Generator().manual_seed(seed)
    src, tgt = torch.zeros(n, 10, dtype=torch.long), torch.zeros(n, 12, dtype=torch.long)
    for i, length in enumerate(torch.randint(3, 11, (n,), generator=g).tolist()):
        digits = torch.randint(3, 13, (length,), generator=g)
        src[i, :length] = digits
        tgt[i, 0], tgt[i, 1:length + 1], tgt[i, length + 1] = BOS, digits.flip(0), EOS
    return {"src": src, "tgt": tgt}


class ReversalData:
    def __init__(self):
        self.pos = 0

    def __iter__(self):
        while True:
            self.pos += 1
            yield reversal_batch(self.pos, 64)

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


def test_learns_to_reverse_digit_strings_with_the_trainer():
    torch.manual_seed(0)
    model = EncoderDecoder(EncoderDecoderConfig(vocab_size=13, d_model=64, n_heads=4, n_encoder_layers=2,
                                                n_decoder_layers=2, ffn_dim=256, dropout=0.0, max_len=32))
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(out_dir=out, max_steps=300, lr=3e-3, warmup_steps=50, min_lr_ratio=0.0, weight_decay=0.0,
                             beta2=0.98, save_every=300, eval_every=1000, progress=False)
        Trainer(model, config, ReversalData(), objective=Seq2Seq(PAD)).fit()
    model.eval()
    test = reversal_batch(10**6, 1000)  # held out: seeds the training stream never reaches
    out = model.greedy(test["src"], 12)
    exact = sum(out[i, : int((test["tgt"][i, 1:] != PAD).sum())].tolist() ==
                test["tgt"][i, 1:][test["tgt"][i, 1:] != PAD].tolist() for i in range(1000))
    assert exact / 1000 >= 0.99
