"""SFT data: exactly the assistant turns are trained; prefix masks; padding; truncation; bad lines; resume."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from lucidlm.jsonl import DataError
from lucidlm.tokenizer import byte_tokenizer
from lucidlm.train.sft_data import PreferenceDataset, SFTDataset
from lucidlm.train.tokenizer_training import CHATML

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who bakes?"},
        {"role": "assistant", "content": "Anna."}, {"role": "user", "content": "And fishes?"},
        {"role": "assistant", "content": "Ben, daily."}]


def chat_tokenizer():
    tok = byte_tokenizer(("<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"))
    tok.config["chat_template"] = tok.chat_template = CHATML
    return tok


def write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def trained_text(tok, batch, row=0):
    keep = batch["labels"][row] != -100
    return tok.decode(batch["input_ids"][row][keep].tolist())


def test_only_assistant_turns_are_trained(tmp_path):
    tok = chat_tokenizer()
    data = SFTDataset([write(tmp_path / "a.jsonl", [{"messages": CHAT}])], tok, max_len=512, batch_size=1, epochs=1)
    batch = next(iter(data))
    assert trained_text(tok, batch) == "Anna.<|im_end|>\nBen, daily.<|im_end|>\n"
    full = tok.decode(batch["input_ids"][0].tolist())
    assert full == tok.apply_chat_template(CHAT, add_generation_prompt=False)


def test_instruction_rows_with_and_without_template_and_prefix_mask(tmp_path):
    rows = [{"prompt": "Say hi", "response": "hi"}, {"instruction": "Add", "input": "2+2", "output": "4"}]
    plain = byte_tokenizer()
    data = SFTDataset([write(tmp_path / "p.jsonl", rows)], plain, 64, batch_size=2, epochs=1, prefix_lm=True)
    batch = next(iter(data))
    assert trained_text(plain, batch, 0) == "hi<|eos|>" and trained_text(plain, batch, 1) == "4<|eos|>"
    n0 = len(plain.encode("Say hi"))
    assert batch["prefix_mask"][0].tolist() == [True] * n0 + [False] * (batch["input_ids"].shape[1] - n0)
    assert batch["attention_mask"][0].sum() == n0 + 3 and (batch["labels"][0, n0 + 3:] == -100).all()  # padding
    assert batch["input_ids"][0, n0 + 3:].eq(plain.pad_token_id).all()
    chat = SFTDataset([tmp_path / "p.jsonl"], chat_tokenizer(), 64, batch_size=2, epochs=1)
    assert trained_text(chat_tokenizer(), next(iter(chat)), 0) == "hi<|im_end|>\n"


def test_truncation_is_counted_and_a_prompt_filling_max_len_is_an_error(tmp_path):
    tok = byte_tokenizer()
    rows = [{"prompt": "ab", "response": "x" * 50}, {"prompt": "p" * 40, "response": "y"}]
    data = SFTDataset([write(tmp_path / "t.jsonl", rows[:1])], tok, max_len=20, batch_size=1, epochs=1)
    assert next(iter(data))["input_ids"].shape[1] == 20 and data.truncated == 1
    bad = SFTDataset([write(tmp_path / "u.jsonl", rows[1:])], tok, max_len=20, batch_size=1, epochs=1)
    with pytest.raises(DataError, match=r"u.jsonl:1: the prompt alone fills max_len=20"):
        next(iter(bad))


def test_bad_lines_name_file_and_line_or_are_skipped_and_counted(tmp_path):
    tok = byte_tokenizer()
    path = write(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, "{not json", {"prompt": 3, "response": "x"},
                                          {"prompt": "c"}, {"prompt": "d", "response": "e"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: Expecting property name"):
        list(SFTDataset([path], tok, 64, batch_size=1, epochs=1))
    data = SFTDataset([path], tok, 64, batch_size=1, epochs=1, skip_bad_lines=True)
    assert len(list(data)) == 2 and len(data.skipped) == 3
    assert "bad.jsonl:3: field 'prompt' must be a string" in data.skipped[1]
    assert "bad.jsonl:4: missing field" in data.skipped[2]
    empty = SFTDataset([write(tmp_path / "e.jsonl", ["{oops"])], tok, 64, 1, epochs=1, skip_bad_lines=True)
    with pytest.raises(ValueError, match="no usable rows"):
        list(empty)


def test_resume_reads_on_from_the_same_row(tmp_path):
    tok = byte_tokenizer()
    path = write(tmp_path / "r.jsonl", [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(7)])
    straight = list(itertools.islice(SFTDataset([path], tok, 64, 2), 9))  # crosses epochs
    first = SFTDataset([path], tok, 64, 2)
    head = list(itertools.islice(iter(first), 3))
    second = SFTDataset([path], tok, 64, 2)
    second.load_state_dict(first.state_dict())
    tail = list(itertools.islice(iter(second), 6))
    for a, b in zip(straight, head + tail, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])


def test_preference_pairs(tmp_path):
    tok = chat_tokenizer()
    rows = [{"prompt": "Who bakes?", "chosen": "Anna.", "rejected": "Nobody at all."},
            {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "Go."}]
    batch = next(iter(PreferenceDataset([write(tmp_path / "d.jsonl", rows)], tok, 128, batch_size=2, epochs=1)))
    assert trained_text(tok, {"input_ids": batch["chosen_input_ids"], "labels": batch["chosen_labels"]}) == \
        "Anna.<|im_end|>\n"
    assert trained_text(tok, {"input_ids": batch["rejected_input_ids"], "labels": batch["rejected_labels"]}, 1) == \
        "Go.<|im_end|>\n"


def test_prefix_lm_batches_let_the_prompt_attend_both_ways_and_truncation_reaches_the_log(tmp_path):
    from tiny_lm import tiny_model

    from lucidlm.train.metrics import read_metrics
    from lucidlm.train.trainer import TrainConfig, Trainer

    tok = byte_tokenizer()
    rows = [{"prompt": "abcd", "response": "xy"}, {"prompt": "q", "response": "z" * 40}]
    data = SFTDataset([write(tmp_path / "p.jsonl", rows)], tok, 24, batch_size=2, prefix_lm=True)
    batch = next(iter(data))
    model = tiny_model(vocab_size=tok.vocab_size)
    changed = batch["input_ids"].clone()
    changed[0, 3] = tok.encode("Z", add_special_tokens=False)[0]  # a later prompt token
    with torch.no_grad():
        a = model(batch["input_ids"], prefix_mask=batch["prefix_mask"])[0, 1]
        b = model(changed, prefix_mask=batch["prefix_mask"])[0, 1]
        causal = model(batch["input_ids"])[0, 1], model(changed)[0, 1]
    assert not torch.allclose(a, b)  # position 1 sees position 3 inside the prefix
    torch.testing.assert_close(*causal)  # without the prefix mask it cannot
    config = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=2, progress=False, save_every=10)
    Trainer(model, config, SFTDataset([tmp_path / "p.jsonl"], tok, 24, 2, prefix_lm=True)).fit()
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["truncated"] >= 1


def test_resume_from_the_end_of_an_epoch(tmp_path):
    tok = byte_tokenizer()
    path = write(tmp_path / "e.jsonl", [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(4)])
    first = SFTDataset([path], tok, 64, 2)
    head = list(itertools.islice(iter(first), 2))  # exactly one epoch: the state stands at its last row
    second = SFTDataset([path], tok, 64, 2)
    second.load_state_dict(first.state_dict())
    nxt = next(iter(second))
    assert torch.equal(nxt["input_ids"], head[0]["input_ids"])  # the next epoch starts again at row 1


def test_a_template_ending_in_a_space_trains_the_answers_first_word(tmp_path):
    """Byte-level BPE writes the space into the next word (" Anna"): after "A: " the answer's first token starts
    on the template's space and must still be trained; the prompt it leaves is what RL encodes (encode_prompt)."""
    from lucidlm.train.rewards import RLPrompt
    from lucidlm.train.rl_rollouts import encode_prompt
    from lucidlm.train.tokenizer_training import train_bpe_tokenizer

    corpus = write(tmp_path / "c.txt", ["Q: Who bakes?\nA: Anna bakes.\nQ: Who fishes?\nA: Ben fishes."] * 50)
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n{% else %}A: "
                "{{ m['content'] }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}")
    tok = train_bpe_tokenizer([corpus], 300, chat_template=template)
    assert len(tok.encode(" Anna")) == 1  # the space merged into the word
    question = [{"role": "user", "content": "Who bakes?"}]
    row = {"messages": question + [{"role": "assistant", "content": "Anna bakes."}]}
    batch = next(iter(SFTDataset([write(tmp_path / "a.jsonl", [row])], tok, 512, 1, 1)))
    assert trained_text(tok, batch) == " Anna bakes.\n"
    keep = (batch["labels"][0] != -100).tolist()
    prompt = batch["input_ids"][0][:keep.index(True)].tolist()
    assert prompt == encode_prompt(RLPrompt(messages=tuple(question)), tok)
    assert tok.decode(prompt) == "Q: Who bakes?\nA:"
