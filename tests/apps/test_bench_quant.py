"""``lucidlm bench --quant`` (apps/bench_quant.py) on a tiny GGUF model: a row per format with its own bytes,
speed, perplexity and agreement; the bytes a decode step reads counted by hand; agreement position by position."""

from __future__ import annotations

import math

import pytest
from gguf_models import write_gguf

from lucidlm.api import load
from lucidlm.apps.bench import decode_weight_bytes
from lucidlm.apps.bench_quant import RANDOM_125M, _measure_formats, agreement, quant_table, run_quant_bench
from lucidlm.jsonl import write_jsonl
from lucidlm.probe.probe import ProbeConfig, ProbeHead, save_probe


def test_agreement_is_position_by_position():
    assert agreement([[1, 2, 3], [4]], [[1, 2, 4], [4]]) == 0.75


def test_decode_bytes_count_every_weight_but_the_lookup_and_a_tied_head_in_full(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "llama", "Q4_1", with_dequantized=False).path  # tied head
    lm = load(path, compile="off", quantize="none")  # float weights
    model = lm.model
    embed = model.embed.weight.numel() * 4
    params = sum(p.numel() * 4 for p in model.parameters())  # the tied head is the embedding: counted once here
    assert decode_weight_bytes(model) == params - embed + embed  # everything but the lookup, plus the head in full
    quantized = load(path, compile="off", quantize="int4")
    assert decode_weight_bytes(quantized.model) < decode_weight_bytes(model) / 4


def test_a_row_per_format_and_the_table(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "qwen2", "Q4_0", with_dequantized=False).path
    rows, bandwidth = run_quant_bench(path, prompt=8, new=4, repeats=1, print_fn=lambda s: None, way="eager")
    labels = [r.label for r in rows]
    assert labels == ["float32", "bfloat16", "int8", "int4", "GGUF as stored (Q4_0)"]
    by = {r.label: r for r in rows}
    assert by["bfloat16"].agreement == 1.0  # the reference itself
    assert by["int8"].weight_bytes < by["bfloat16"].weight_bytes < by["float32"].weight_bytes
    assert by["int4"].weight_bytes < by["int8"].weight_bytes
    assert all(math.isfinite(r.perplexity) and r.perplexity > 1 for r in rows)
    # a tiny model's decode step can drown in a busy machine's noise: then NaN, never a negative rate
    assert all(not r.decode_1 <= 0 and not r.decode_8 <= 0 for r in rows)
    assert abs(by["float32"].perplexity / by["bfloat16"].perplexity - 1) < 0.05
    table = quant_table(rows, bandwidth, "tiny")
    assert table.count("\n| ") == len(rows) + 1 and "GGUF as stored (Q4_0)" in table


def test_llamacpp_is_asked_for_by_name_before_anything_is_measured(tmp_path, monkeypatch):
    import lucidlm.apps.bench_quant as bench_quant

    path = write_gguf(tmp_path / "m.gguf", "qwen2", "Q4_0", with_dequantized=False).path
    real = bench_quant.importlib.util.find_spec
    monkeypatch.setattr(bench_quant.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    with pytest.raises(RuntimeError, match=r"llama-cpp-python: pip install 'lucidlm\[llamacpp\]'"):
        run_quant_bench(path, llamacpp=True, print_fn=lambda s: None)
    hf = tmp_path / "hf"
    load(path, compile="off", quantize="none").save(hf)
    with pytest.raises(ValueError, match="llama.cpp on a GGUF file"):
        run_quant_bench(hf, llamacpp=True, print_fn=lambda s: None)


def finished_demo(directory, lm):
    """A demo directory as `lucidlm demo` leaves it (answers with labelled claims, a probe), for ``lm``."""
    rows = []
    for i in range(40):
        value = ("Paris", "Rome", "Oslo", "Lima")[i % 4]
        answer = f"The capital is {value}."
        for sample in range(2):
            rows.append({"id": f"q{i}", "type": "capital", "entity": f"country{i}", "sample": sample,
                         "conversation": [{"role": "user", "content": f"Capital of country{i}?"},
                                          {"role": "assistant", "content": answer}],
                         "annotations": [{"span": value, "index": answer.index(value), "value": value,
                                          "label": "Not Supported" if i % 3 == 0 else "Supported"}]})
    (directory / "answers").mkdir(parents=True)
    write_jsonl(directory / "answers" / "answers.jsonl", rows)
    head = ProbeHead(lm.config.dim)
    save_probe(directory / "probe" / "probe", head, ProbeConfig(1, lm.config.dim, lm.config.n_layers))
    return directory


def test_the_demos_probe_is_measured_per_format(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "qwen2", "Q4_0", with_dequantized=False).path
    demo = finished_demo(tmp_path / "demo", load(path, compile="off"))
    rows, bandwidth = run_quant_bench(path, prompt=8, new=4, repeats=1, print_fn=lambda s: None, way="eager",
                                      demo=demo)
    counts = {(r.probe["probe"]["n"], r.probe["probe"]["positives"]) for r in rows}
    assert len(counts) == 1 and next(iter(counts))[0] > 0  # the same held-out claims in every format
    for r in rows:
        for method in ("probe", "nll"):
            a = r.probe[method]
            assert a["lo"] <= a["auroc"] <= a["hi"], (r.label, method)
    table = quant_table(rows, bandwidth, "tiny")
    assert "held-out greedy claims" in table and table.count(" [") >= len(rows)


def test_a_missing_demo_is_named_before_anything_is_measured(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "qwen2", "Q4_0", with_dequantized=False).path
    with pytest.raises(FileNotFoundError, match="no finished demo.*run `lucidlm demo` first"):
        run_quant_bench(path, demo=tmp_path / "nowhere", print_fn=lambda s: None)


def test_a_checkpoint_without_a_tokenizer_gets_the_speed_columns_only(tmp_path):
    """As the random 125M (``--model random-125m``): no text to measure quality on."""
    from tiny_lm import tiny_model

    from lucidlm.checkpoint import FAMILIES, save_model

    save_model(tiny_model("llama-125m", vocab_size=256), tmp_path / "m", FAMILIES["llama"])
    rows, bandwidth = _measure_formats(tmp_path / "m", 8, 4, 1, lambda s: None, "eager", None, None)
    assert [r.label for r in rows] == ["float32", "bfloat16", "int8", "int4"]
    assert all(not r.decode_1 <= 0 and not r.decode_8 <= 0 for r in rows)  # a rate, or NaN when noise drowned it
    assert all(math.isnan(r.perplexity) and math.isnan(r.agreement) for r in rows)
    assert "| — |" in quant_table(rows, bandwidth, "random")
    with pytest.raises(ValueError, match="random-125m has no GGUF file nor demo"):
        run_quant_bench(RANDOM_125M, llamacpp=True, print_fn=lambda s: None)
