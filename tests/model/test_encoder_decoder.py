"""The original Transformer: layers and whole stacks equal torch.nn's reference implementation, the
sinusoidal table is the paper's formula, masks hold, the paper's sizes give its parameter counts, and
it learns to reverse digit strings."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lucidlm.model.encoder_decoder import (
    DecoderLayer,
    EncoderDecoder,
    EncoderDecoderConfig,
    EncoderLayer,
    encoder_decoder_preset,
    transformer_base,
)
from lucidlm.train.seq2seq import exact_match, train_seq2seq

PAD, BOS, EOS = 0, 1, 2
SMALL = dict(vocab_size=13, d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, ffn_dim=64, dropout=0.0,
             max_len=32)


def small_model(**overrides) -> EncoderDecoder:
    return EncoderDecoder(EncoderDecoderConfig(**{**SMALL, **overrides})).eval()


# --- torch.nn as the reference -------------------------------------------------------------------
def randomise(module: nn.Module) -> None:
    """torch starts norms at 1/0 and attention biases at 0: random values make every copy count."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.2)


def copy_attention(ours: nn.Module, theirs: nn.MultiheadAttention, bias: bool) -> None:
    d = theirs.embed_dim
    with torch.no_grad():
        if not bias:  # the paper's projections have none
            theirs.in_proj_bias.zero_()
            theirs.out_proj.bias.zero_()
        for i, proj in enumerate((ours.q_proj, ours.k_proj, ours.v_proj)):
            proj.weight.copy_(theirs.in_proj_weight[i * d:(i + 1) * d])
            if bias:
                proj.bias.copy_(theirs.in_proj_bias[i * d:(i + 1) * d])
        ours.o_proj.weight.copy_(theirs.out_proj.weight)
        if bias:
            ours.o_proj.bias.copy_(theirs.out_proj.bias)


def copy_ffn_and_norms(ours: nn.Module, theirs: nn.Module, subs: list[nn.Module]) -> None:
    with torch.no_grad():
        ours.ffn.up_proj.weight.copy_(theirs.linear1.weight)
        ours.ffn.up_proj.bias.copy_(theirs.linear1.bias)
        ours.ffn.down_proj.weight.copy_(theirs.linear2.weight)
        ours.ffn.down_proj.bias.copy_(theirs.linear2.bias)
    for sub, norm in zip(subs, (theirs.norm1, theirs.norm2, getattr(theirs, "norm3", None))):
        sub.norm.load_state_dict(norm.state_dict())


def copy_encoder_layer(ours: EncoderLayer, theirs: nn.TransformerEncoderLayer, bias: bool) -> None:
    copy_attention(ours.self_attn, theirs.self_attn, bias)
    copy_ffn_and_norms(ours, theirs, [ours.attn_sub, ours.ffn_sub])


def copy_decoder_layer(ours: DecoderLayer, theirs: nn.TransformerDecoderLayer, bias: bool) -> None:
    copy_attention(ours.self_attn, theirs.self_attn, bias)
    copy_attention(ours.cross_attn, theirs.multihead_attn, bias)
    copy_ffn_and_norms(ours, theirs, [ours.self_sub, ours.cross_sub, ours.ffn_sub])


def torch_layers(placement: str) -> tuple[nn.TransformerEncoderLayer, nn.TransformerDecoderLayer]:
    kw = dict(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, activation="relu", batch_first=True,
              norm_first=placement == "pre")
    enc, dec = nn.TransformerEncoderLayer(**kw), nn.TransformerDecoderLayer(**kw)
    randomise(enc)
    randomise(dec)
    return enc.eval(), dec.eval()


SRC_PAD = torch.tensor([[False] * 7, [False] * 4 + [True] * 3])  # torch's convention: True = padding


@pytest.mark.parametrize("placement", ["post", "pre"])
@pytest.mark.parametrize("attn_bias", [False, True])
def test_layers_equal_torch_reference_layers(placement, attn_bias):
    cfg = EncoderDecoderConfig(**SMALL, norm_placement=placement, attn_bias=attn_bias)
    x, mem = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    keys = (~SRC_PAD)[:, None, None, :]  # ours: True = attend
    ref_enc, ref_dec = torch_layers(placement)

    enc = EncoderLayer(cfg).eval()
    copy_encoder_layer(enc, ref_enc, attn_bias)
    torch.testing.assert_close(enc(mem, keys), ref_enc(mem, src_key_padding_mask=SRC_PAD), rtol=1e-5, atol=1e-5)

    dec = DecoderLayer(cfg).eval()
    copy_decoder_layer(dec, ref_dec, attn_bias)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    expected = ref_dec(x, mem, tgt_mask=nn.Transformer.generate_square_subsequent_mask(5),
                       memory_key_padding_mask=SRC_PAD)
    out = dec(x, causal, dec.cross_attn.project_memory(mem), keys)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def paper_positions(n: int, d: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)), in float64."""
    pe = torch.zeros(n, d, dtype=torch.float64)
    for pos in range(n):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            pe[pos, 2 * i], pe[pos, 2 * i + 1] = math.sin(angle), math.cos(angle)
    return pe


def test_sinusoidal_table_is_the_papers_formula():
    model = small_model()
    torch.testing.assert_close(model.positions.table.double(), paper_positions(32, 32), rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:enable_nested_tensor")  # torch's note on its pre-norm fast path
@pytest.mark.parametrize("placement", ["post", "pre"])
def test_whole_model_equals_torch_encoder_and_decoder_stacks(placement):
    """Embeddings·√d + the paper's PE, the stacks (pre-norm: with their final norms), tied output."""
    model = small_model(norm_placement=placement)
    ref = nn.Transformer(32, 4, 2, 2, 64, 0.0, activation="relu", batch_first=True, norm_first=placement == "pre")
    randomise(ref)
    ref.eval()
    if placement == "post":  # torch always adds a final norm; the paper's post-norm stacks have none
        ref.encoder.norm = ref.decoder.norm = None
    for ours, theirs in zip(model.encoder, ref.encoder.layers):
        copy_encoder_layer(ours, theirs, bias=False)
    for ours, theirs in zip(model.decoder, ref.decoder.layers):
        copy_decoder_layer(ours, theirs, bias=False)
    if placement == "pre":
        model.encoder_norm.load_state_dict(ref.encoder.norm.state_dict())
        model.decoder_norm.load_state_dict(ref.decoder.norm.state_dict())

    src = torch.tensor([[3, 4, 5, 6, 7, 8, 9], [10, 11, 12, 3, PAD, PAD, PAD]])
    tgt = torch.tensor([[BOS, 9, 8, 7, 6], [BOS, 3, 12, 11, 10]])
    emb, pe = model.src_embed.weight, paper_positions(32, 32).float()
    src_in, tgt_in = emb[src] * math.sqrt(32) + pe[:7], emb[tgt] * math.sqrt(32) + pe[:5]
    memory = ref.encoder(src_in, src_key_padding_mask=SRC_PAD)
    hidden = ref.decoder(tgt_in, memory, tgt_mask=nn.Transformer.generate_square_subsequent_mask(5),
                         memory_key_padding_mask=SRC_PAD)
    with torch.no_grad():
        real = ~SRC_PAD  # padding rows differ: ours give padding positions the last real position
        torch.testing.assert_close(model.encode(src)[real], memory[real], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(src, tgt), hidden @ emb.T, rtol=1e-5, atol=1e-5)


# --- masks -----------------------------------------------------------------------------------------
@torch.no_grad()
def test_decoder_never_sees_later_target_tokens():
    model = small_model()
    src = torch.tensor([[5, 6, 7, 8, PAD, PAD], [3, 4, 5, 6, 7, 8]])
    tgt = torch.tensor([[BOS, 9, 10, 11, 12, 3], [BOS, 8, 7, 6, 5, 4]])
    base = model(src, tgt)
    for cut in (1, 3, 5):
        changed = tgt.clone()
        changed[:, cut:] = (changed[:, cut:] + 1 - 3) % 10 + 3  # another digit at every later position
        out = model(src, changed)
        torch.testing.assert_close(out[:, :cut], base[:, :cut], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, cut:], base[:, cut:], atol=1e-3)


@torch.no_grad()
def test_source_padding_changes_nothing():
    model = small_model()
    row = torch.tensor([[5, 6, 7, 8]])
    tgt = torch.tensor([[BOS, 8, 7, 6]])
    alone = model(row, tgt)
    right = torch.tensor([[5, 6, 7, 8, PAD, PAD, PAD]])  # pad_id marks padding by default
    torch.testing.assert_close(model(right, tgt), alone, rtol=1e-5, atol=1e-5)
    left = torch.tensor([[9, 9, 5, 6, 7, 8]])  # left padding holding arbitrary ids: the mask decides
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    torch.testing.assert_close(model(left, tgt, src_mask=mask), alone, rtol=1e-5, atol=1e-5)
    batch = torch.tensor([[5, 6, 7, 8, PAD, PAD], [3, 4, 5, 6, 7, 8]])  # beside a longer row
    torch.testing.assert_close(model(batch, tgt.expand(2, 4))[:1], alone, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_left_padded_targets_with_a_target_mask():
    model = small_model()
    src = torch.tensor([[5, 6, 7, 8]])
    alone = model(src, torch.tensor([[BOS, 8, 7]]))
    padded = model(src, torch.tensor([[PAD, PAD, BOS, 8, 7]]), tgt_mask=torch.tensor([[0, 0, 1, 1, 1]]))
    torch.testing.assert_close(padded[:, 2:], alone, rtol=1e-5, atol=1e-5)


# --- generation ------------------------------------------------------------------------------------
@torch.no_grad()
def test_cached_greedy_equals_recomputing_the_prefix():
    model = small_model(vocab_size=50)  # random weights: EOS (1 of 50) rarely ends a row early
    src = torch.randint(3, 50, (4, 9))
    src[1, 6:] = PAD
    ids, logits = model.greedy(src, 12, return_logits=True)
    ids_full, logits_full = model.greedy(src, 12, use_cache=False, return_logits=True)
    assert torch.equal(ids, ids_full)
    torch.testing.assert_close(logits, logits_full, rtol=1e-5, atol=1e-5)
    prefix = torch.cat([torch.full((4, 1), BOS), ids[:, :-1]], 1)  # what each step had read
    torch.testing.assert_close(logits, model(src, prefix), rtol=1e-5, atol=1e-5)  # the teacher-forced logits
    torch.testing.assert_close(logits.argmax(-1)[ids != PAD], ids[ids != PAD], rtol=0, atol=0)
    _, alone = model.greedy(src[1:2, :6], ids.shape[1], return_logits=True)  # the padded row, unpadded
    torch.testing.assert_close(logits[1:2, : alone.shape[1]], alone, rtol=1e-5, atol=1e-5)


# --- embeddings, parameters, config --------------------------------------------------------------
def test_tied_shared_and_separate_embeddings(tmp_path):
    shared = small_model()
    assert shared.tgt_embed is None and shared.lm_head is None  # one matrix: source, target, output
    separate = small_model(tgt_vocab_size=17, tie_embeddings=False)
    assert separate.tgt_embed.weight.shape == (17, 32) and separate.lm_head.weight.shape == (17, 32)
    logits = separate(torch.tensor([[3, 4, 12]]), torch.tensor([[BOS, 16, 15]]))
    assert logits.shape == (1, 3, 17)
    n = shared.num_parameters()
    assert small_model(tie_embeddings=False).num_parameters() == n + 13 * 32
    assert small_model(tgt_vocab_size=13).num_parameters() == n + 13 * 32
    for model in (shared, separate):  # no aliased tensors: the trainer's safetensors checkpoints accept it
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))


def test_dropout_acts_in_training_only():
    model = small_model(dropout=0.1)
    src, tgt = torch.tensor([[3, 4, 5, 6]]), torch.tensor([[BOS, 6, 5]])
    with torch.no_grad():
        assert torch.equal(model(src, tgt), model(src, tgt))
        model.train()
        assert not torch.allclose(model(src, tgt), model(src, tgt))


def layer_count(d: int, f: int, attentions: int) -> int:
    """Attention: 4 d×d matrices (no biases); FFN: d×f + f + f×d + d; a LayerNorm (2d) per sublayer."""
    return attentions * 4 * d * d + 2 * d * f + f + d + (attentions + 1) * 2 * d


@pytest.mark.parametrize("name, paper", [("transformer-base", 65e6), ("transformer-big", 213e6)])
def test_paper_configurations_have_the_papers_parameter_counts(name, paper):
    cfg = encoder_decoder_preset(name)
    with torch.device("meta"):
        model = EncoderDecoder(cfg)
    d, f = cfg.d_model, cfg.ffn_dim
    expected = 37000 * d + 6 * layer_count(d, f, 1) + 6 * layer_count(d, f, 2)
    assert model.num_parameters() == expected
    assert abs(expected - paper) / paper < 0.05  # Table 3; base: 63.1 M, big: 213.9 M
    assert transformer_base() == encoder_decoder_preset("transformer-base")
    assert (cfg.n_encoder_layers, cfg.n_decoder_layers, cfg.vocab_size, cfg.norm_placement) == (6, 6, 37000, "post")


def test_bad_configs_name_the_problem():
    with pytest.raises(ValueError, match="multiple of n_heads"):
        EncoderDecoderConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="norm_placement"):
        EncoderDecoderConfig(norm_placement="sandwich")
    with pytest.raises(ValueError, match="eos_id"):
        EncoderDecoderConfig(vocab_size=2)
    with pytest.raises(ValueError, match="unknown EncoderDecoderConfig preset"):
        encoder_decoder_preset("transformer-huge")
    with pytest.raises(ValueError, match="d_modl"):
        encoder_decoder_preset("transformer-base", d_modl=64)
    with pytest.raises(ValueError, match="max_len"):
        small_model(max_len=8)(torch.ones(1, 9, dtype=torch.long), torch.ones(1, 2, dtype=torch.long))


# --- learning ------------------------------------------------------------------------------------
def reversal_batch(g: torch.Generator, n: int, exclude: frozenset = frozenset()) -> dict[str, torch.Tensor]:
    """Digit strings (tokens 3..12) of 3 to 10 digits, none in ``exclude``; the target is the string reversed."""
    src, tgt = torch.zeros(n, 10, dtype=torch.long), torch.zeros(n, 12, dtype=torch.long)
    i = 0
    while i < n:
        digits = torch.randint(3, 13, (int(torch.randint(3, 11, (1,), generator=g)),), generator=g)
        if tuple(digits.tolist()) in exclude:
            continue
        k = len(digits)
        src[i, :k] = digits
        tgt[i, 0], tgt[i, 1:k + 1], tgt[i, k + 1] = BOS, digits.flip(0), EOS
        i += 1
    return {"src": src, "tgt": tgt}


def reversal_stream(seed: int, n: int, exclude: frozenset) -> Iterator[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    while True:
        yield reversal_batch(g, n, exclude)


def test_learns_to_reverse_digit_strings():
    held_out = reversal_batch(torch.Generator().manual_seed(1), 1000)
    seen = frozenset(tuple(row[row != PAD].tolist()) for row in held_out["src"])  # never trained on
    torch.manual_seed(0)
    model = EncoderDecoder(EncoderDecoderConfig(vocab_size=13, d_model=64, n_heads=4, n_encoder_layers=2,
                                                n_decoder_layers=2, ffn_dim=256, dropout=0.0, max_len=16))
    start = time.perf_counter()
    losses = train_seq2seq(model, reversal_stream(0, 128, seen), steps=300, lr=3e-3, warmup=50, schedule="cosine",
                           label_smoothing=0.0)
    seconds = time.perf_counter() - start
    accuracy = exact_match(model, held_out)
    print(f"reversal: exact match {accuracy:.3f} on 1000 held-out strings after {seconds:.1f} s of training, "
          f"final loss {losses[-1]:.4f}")
    assert accuracy >= 0.99
