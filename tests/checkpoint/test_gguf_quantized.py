"""GGUF weights kept quantized (``load_model(..., quantize="gguf")``): a tiny random model written with the gguf
package's writer at Q8_0 / Q4_0 / Q4_1 loads with its linear layers as those integers and scales (Q8_0 as float
where only torch's kernels run: they have none for it), holds exactly the weights the file's blocks describe
(gguf.quants' own dequantization), predicts the logits of its dequantized copy and generates its greedy tokens;
any checkpoint quantizes to int8 / int4 on load; bad requests are named."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf_models import write_gguf

import lucidlm
from lucidlm.api import LM, default_quantize
from lucidlm.checkpoint.gguf import GGUFTensors
from lucidlm.checkpoint.loader import load_model, load_tokenizer
from lucidlm.model.fused_projections import FUSED
from lucidlm.model.quantize import is_quantized
from lucidlm.model.quantized_linear import QuantizedLinear, choose_kernel
from lucidlm.train.trainer import TrainConfig, Trainer

SCHEME = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}
OURS = choose_kernel(64) == "lucidlm"  # lucidlm's kernels run here (AVX2): Q8_0 stays quantized


def stays_quantized(qtype: str) -> bool:
    return qtype != "Q8_0" or OURS
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module", params=list(SCHEME))
def written(request, tmp_path_factory):
    qtype = request.param
    m = write_gguf(tmp_path_factory.mktemp(qtype) / "m.gguf", "qwen2", qtype, with_dequantized=False)
    return qtype, m.path


def dequantized(model, name: str) -> torch.Tensor:
    """Layer ``name``'s Ŵ, also where it was fused with its siblings (then its rows of the fused layer)."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if hasattr(parent, leaf):
        return getattr(parent, leaf).dequantize()
    fused, parts = next((f, p) for f, p in FUSED.items() if leaf in p)
    w = getattr(parent, fused).dequantize()
    sizes = parent.qkv_split if fused == "qkv_proj" else [w.shape[0] // 2] * 2
    return w.split(sizes)[parts.index(leaf)]


def _layers(model) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def test_linear_layers_hold_the_files_blocks(written):
    qtype, path = written
    model = load_model(path, quantize="gguf").model
    layers = _layers(model)
    if not stays_quantized(qtype):  # torch's kernels have none for int8 in groups: read as float
        assert not layers
        return
    assert set(layers) == {n for n, _ in model.named_modules() if n.endswith("_proj")} | {"lm_head"}
    assert {m.scheme.name for m in layers.values()} == {SCHEME[qtype]}
    reader = GGUFTensors(path)
    f = reader.file
    for name, theirs in {"blocks.0.attn.q_proj": "model.layers.0.self_attn.q_proj.weight",
                         "blocks.0.attn.v_proj": "model.layers.0.self_attn.v_proj.weight",
                         "blocks.1.mlp.up_proj": "model.layers.1.mlp.up_proj.weight",
                         "blocks.1.mlp.down_proj": "model.layers.1.mlp.down_proj.weight",
                         "lm_head": "lm_head.weight"}.items():
        info = f.tensors[reader._source[theirs]]
        raw = np.frombuffer(f._map, np.uint8, info.nbytes, info.offset).reshape(info.dims[1], -1)
        want = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, info.qtype)))  # the reference
        # exactly with lucidlm's kernels (the file's float16 scales); torch's 4-bit kernel's scales are bfloat16
        atol = 1e-6 if OURS else float(want.abs().max()) * 2**-8
        torch.testing.assert_close(dequantized(model, name), want, atol=atol, rtol=0)


def test_logits_and_greedy_tokens_are_the_dequantized_models(written):
    qtype, path = written
    kept_quantized = stays_quantized(qtype)
    kept, dequantized = load_model(path, quantize="gguf"), load_model(path, quantize="none")
    assert is_quantized(kept.model) == kept_quantized and not is_quantized(dequantized.model)
    tok, defaults = load_tokenizer(path, kept.config)
    lms = [LM(x.model, tok, x.config, path, x.family, x.hf_config, defaults, compile_decode="off")
           for x in (kept, dequantized)]
    ids = torch.tensor([tok.encode(PROMPT)])
    with torch.no_grad():
        ours, theirs = lms[0].model(ids), lms[1].model(ids)
    # lucidlm's kernels round activations to 16-bit integers per block; float Q8_0 is float32; torch's 4-bit
    # kernels compute in bfloat16 (model/quantized_linear.py): each within its rounding
    atol = 2e-4 if OURS or qtype == "Q8_0" else 0.02 * float(theirs.abs().max())
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=0)
    a, b = (lm.generate(PROMPT, max_new_tokens=32, ignore_eos=True)[0] for lm in lms)  # greedy
    assert len(a.token_ids) == len(b.token_ids) == 32
    same = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), 32)
    if same < 32:  # allowed only at a near-tie of the dequantized model, which then picked another token
        with torch.no_grad():
            step = lms[1].model(torch.tensor([tok.encode(PROMPT) + b.token_ids[:same]]))[0, -1]
        gap = float(step[b.token_ids[same]] - step[a.token_ids[same]])
        assert gap < 0.01 * float(step.abs().max()), f"{qtype}: token {same} differs by a logit gap of {gap}"


def test_any_checkpoint_quantizes_on_load(written):
    _, path = written
    head = "q8_0" if OURS else "int8"  # a 4-bit model's head at 8 bits (model/quantize.scheme_of)
    for kind, body in (("int8", "int8"), ("int4", "int4")):
        layers = _layers(load_model(path, quantize=kind).model)
        assert {m.scheme.name for n, m in layers.items() if n != "lm_head"} == {body}
        assert layers["lm_head"].scheme.name == (head if kind == "int4" else "int8")


def test_bad_requests_are_named(written, tmp_path):
    _, path = written
    with pytest.raises(ValueError, match="quantize='int3': expected one of none, gguf, int8, int4"):
        load_model(path, quantize="int3")
    with pytest.raises(ValueError, match="quantized weights run on CPU"):
        load_model(path, quantize="gguf", device="meta")


def test_the_api_loads_quantized_and_refuses_what_does_not_combine(written, tmp_path):
    _, path = written
    lm = lucidlm.load(path, quantize="int8", compile="off")
    assert {m.scheme.name for m in _layers(lm.model).values()} == {"int8"}
    assert len(lm.generate(PROMPT, max_new_tokens=4, ignore_eos=True)[0].token_ids) == 4
    with pytest.raises(ValueError, match="pack_weights packs float weights"):
        lucidlm.load(path, quantize="int8", pack_weights=True)
    with pytest.raises(ValueError, match="LoRA adapter on GGUF-quantized weights is not supported"):
        lucidlm.load(path, quantize="gguf", adapter=tmp_path)
    with pytest.raises(ValueError, match="training needs float weights"):
        Trainer(lm.model, TrainConfig(), [])


def test_a_gguf_file_stays_quantized_by_default_on_cpu(written, tmp_path):
    qtype, path = written
    lm = lucidlm.load(path, compile="off")  # quantize=None: the file's own blocks, as llama.cpp runs them
    assert is_quantized(lm.model) == stays_quantized(qtype)
    assert not is_quantized(lucidlm.load(path, quantize="none", compile="off").model)
    assert default_quantize(path, "cpu") == "gguf"
    assert default_quantize(path, "cuda") == "none"  # quantized kernels are CPU kernels
    assert default_quantize(path, "cpu", adapter=tmp_path) == "none"  # LoRA wraps float layers
    assert default_quantize(path, "cpu", pack_weights=True) == "none"
    saved = lucidlm.load(path, quantize="none", compile="off").save(tmp_path / "hf")  # an HF checkpoint: float
    assert default_quantize(saved, "cpu") == "none"
    if stays_quantized(qtype):
        with pytest.raises(ValueError, match=r"save needs float weights, but blocks\.0\.\w+\.\w+_proj is "
                                             rf"{SCHEME[qtype]}-quantized: load the model with quantize='none'"):
            lm.save(tmp_path / "quantized")
        assert not (tmp_path / "quantized").exists()  # refused before anything was written
