"""``lucidlm rl-pairs``: DPO pairs from sampled answers scored by the verifiable reward. A tiny model is taught two
answers to "France?" (one right, one wrong), one to "Italy?" (right: every sample ties) and two to "Germany?"
(right, or a hedge on an entity marked unknowable: both +1 by default, a tie of different texts); the pairs are
checked against the samples regraded here by the facts grader and a naive score, and the file against DPO's
reader and a 1-step ``lucidlm dpo`` run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import lucidlm
from lucidlm.apps.cli import app
from lucidlm.apps.rl_pairs import (
    balance_by_type,
    best_and_worst,
    build_pairs,
    build_sft_rows,
    dpo_prompt,
    token_differences,
)
from lucidlm.apps.rl_prompts import write_prompts_jsonl
from lucidlm.apps.rl_rewards import FactsGrading, VerifiableRewardConfig
from lucidlm.checkpoint import FAMILIES, save_model
from lucidlm.config import from_preset
from lucidlm.facts import sources
from lucidlm.facts.grader import grade, is_hedge
from lucidlm.facts.questions import question_of
from lucidlm.model.transformer import Transformer
from lucidlm.tokenizer import byte_tokenizer
from lucidlm.train.rewards import RLPrompt, Rollout
from lucidlm.train.sft_data import ChatFormatter, PreferenceDataset, pad_batch

# a short template keeps the sequences short (the model trains in the test)
TEMPLATE = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}a:{% endif %}")
TAUGHT = {"France": ["Paris.", "Berlin."], "Italy": ["Rome."], "Germany": ["Berlin.", "I don't know."]}
SAMPLES = 6
runner = CliRunner()


def prompt_of(country: str) -> RLPrompt:
    entity = next(e for e in sources.countries().values() if e.name == country)
    meta = question_of("country_capital", entity) | {"knowable": country != "Germany"}
    return RLPrompt(messages=({"role": "user", "content": f"{country}?"},), meta=meta)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors on a shared machine: a second thread only waits for the first (10 s against 0.2 s here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny llama taught TAUGHT (each answer of a prompt equally often), saved with its chat template."""
    tok = byte_tokenizer()
    tok.chat_template = TEMPLATE
    cfg = from_preset("llama-125m", tiny=True, dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=64,
                      vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    formatter = ChatFormatter(tok, 64)
    batch = pad_batch([formatter.pair(list(prompt_of(c).messages), a) for c, answers in TAUGHT.items()
                       for a in answers], tok.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(80):
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out = tmp_path_factory.mktemp("taught")
    save_model(model.eval(), out, FAMILIES["llama"])
    tok.save(out)
    (out / "chat_template.jinja").write_text(TEMPLATE)
    return out


def naive_reward(meta: dict, text: str, abstain_unknowable: float = 1.0) -> float:
    """The verifiable reward's table for a one-claim facts answer, with the default points."""
    labels = [a["label"] for a in grade(meta, text.strip())]
    if labels:
        return sum(1.0 if label == "Supported" else -1.0 for label in labels)
    if is_hedge(text):
        return -0.5 if meta["knowable"] else abstain_unknowable
    return -1.0


@pytest.fixture(scope="module")
def sampled(checkpoint) -> list[list[str]]:
    """Each prompt's answers straight from ``lm.sample`` (seed = the prompt's index, as rl-pairs samples)."""
    lm = lucidlm.load(checkpoint, compile="off")
    out = []
    for i, country in enumerate(TAUGHT):
        ids = lm.tokenizer.apply_chat_template(list(prompt_of(country).messages), add_generation_prompt=True,
                                               tokenize=True)
        out.append([c.text for c in lm.sample(ids, SAMPLES, seed=i, max_new_tokens=14)])
    return out


def expected_pairs(sampled: list[list[str]], abstain_unknowable: float) -> list[tuple[str, str, str, float, float]]:
    """(id, chosen, rejected, their rewards): the samples regraded here, ties left out."""
    out = []
    for country, texts in zip(TAUGHT, sampled):
        meta = prompt_of(country).meta
        rewards = [naive_reward(meta, t, abstain_unknowable) for t in texts]
        hi, lo = max(rewards), min(rewards)
        if hi > lo:
            out.append((meta["id"], texts[rewards.index(hi)], texts[rewards.index(lo)], hi, lo))
    return out


def as_tuples(rows: list[dict]) -> list[tuple]:
    return [(r["id"], r["chosen"], r["rejected"], r["chosen_reward"], r["rejected_reward"]) for r in rows]


def test_pairs_are_the_best_and_worst_of_the_regraded_samples_ties_skipped(checkpoint, sampled):
    lm = lucidlm.load(checkpoint, compile="off")
    prompts = [prompt_of(c) for c in TAUGHT]
    rows, summary = build_pairs(lm, prompts, FactsGrading(), SAMPLES, VerifiableRewardConfig(), max_new_tokens=14)
    expected = expected_pairs(sampled, 1.0)
    assert as_tuples(rows) == expected and all(hi > lo for *_, hi, lo in expected)
    # Italy's answers are all "Rome."; Germany's right answer and its hedge (unknowable) are both +1: ties
    assert [summary[k] for k in ("pairs", "skipped_ties", "retokenized", "end_differs")] == [1, 2, 0, 0]
    assert summary["mean_chosen_reward"] == expected[0][3] and summary["mean_rejected_reward"] == expected[0][4]
    assert best_and_worst([0.5, -1.0, 0.5, -1.0]) == (0, 1) and best_and_worst([1.0, 1.0]) is None


def test_the_cli_writes_pairs_dpo_reads_on_rls_tokens_and_trains_on(checkpoint, sampled, tmp_path):
    prompts = [prompt_of(c) for c in TAUGHT]
    write_prompts_jsonl(tmp_path / "prompts.jsonl", prompts)
    pairs = tmp_path / "pairs.jsonl"
    result = runner.invoke(app, ["rl-pairs", "-m", str(checkpoint), "--prompts", str(tmp_path / "prompts.jsonl"),
                                 "--grader", "facts", "--samples", str(SAMPLES), "--max-new-tokens", "14",
                                 "--verifiable.abstain-unknowable", "0.5", "--out", str(pairs)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert (summary["pairs"], summary["skipped_ties"]) == (2, 1)  # the hedge on Germany now scores below "Berlin."
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert as_tuples(rows) == expected_pairs(sampled, 0.5)
    assert [r["prompt"] for r in rows] == [list(prompts[0].messages), list(prompts[2].messages)]

    lm = lucidlm.load(checkpoint, compile="off")
    batch = next(iter(PreferenceDataset([pairs], lm.tokenizer, max_len=64, batch_size=2, epochs=1)))
    for i, row in enumerate(rows):  # DPO's tokens: RL's prompt ids, then the response, then the turn's end
        head = lm.tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True)
        for side in ("chosen", "rejected"):
            ids, labels = batch[f"{side}_input_ids"][i], batch[f"{side}_labels"][i]
            answer = lm.tokenizer.encode(row[side], add_special_tokens=False) + [lm.tokenizer.eos_token_id]
            assert ids[: len(head)].tolist() == head and (labels[: len(head)] == -100).all()
            assert labels[len(head): len(head) + len(answer)].tolist() == answer

    result = runner.invoke(app, ["dpo", "--model", str(checkpoint), "--data", str(pairs), "--batch-size", "2",
                                 "--max-len", "64", "--train.max-steps", "1", "--train.warmup-steps", "0",
                                 "--train.out-dir", str(tmp_path / "dpo")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "dpo" / "model").is_dir()


def test_bad_input_is_refused_before_the_model_loads(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    write_prompts_jsonl(prompts, [prompt_of("France")])
    base = ["rl-pairs", "-m", str(tmp_path / "no-model"), "--out", str(tmp_path / "pairs.jsonl")]
    cases = [(["--prompts", str(prompts), "--grader", "probe"], "unknown grader 'probe'"),
             (["--prompts", str(prompts), "--grader", "facts", "--samples", "1"], "--samples must be >= 2"),
             (["--prompts", str(tmp_path / "none.jsonl"), "--grader", "facts"], "prompt files not found"),
             (["--prompts", str(prompts), "--grader", "facts", "--balance"], "--balance balances R-Tuning's SFT")]
    for args, message in cases:  # the model directory does not exist: a load would fail otherwise
        result = runner.invoke(app, base + args)
        assert result.exit_code != 0 and message in str(result.exception), (args, result.exception)
    assert not (tmp_path / "pairs.jsonl").exists()
    with pytest.raises(ValueError, match="DPO would wrap the text in the template again"):  # (no model needed)
        tok = byte_tokenizer()
        tok.chat_template = TEMPLATE
        dpo_prompt(RLPrompt(text="France?", meta={}), tok)


def test_token_differences_see_a_retokenized_text_and_a_turn_that_ends_without_eos():
    tok = byte_tokenizer()
    prompt = prompt_of("France")
    eos = [tok.eos_token_id]
    q_a = ("{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n{% else %}A: {{ m['content'] }}"
           "\n{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}")  # the world's: turns end in \n
    for template, ends_with_eos in ((TEMPLATE, True), (q_a, False)):
        tok.chat_template = template
        formatter = ChatFormatter(tok, 64)
        head = dpo_prompt(prompt, tok)

        def rollout(ids: list[int]) -> Rollout:
            return Rollout(prompt, (), tuple(ids), "Paris.", "stop")

        assert token_differences(formatter, head, rollout(tok.encode("Paris.", False) + eos)) == (
            False, not ends_with_eos)
        assert token_differences(formatter, head, rollout(tok.encode("Paris!", False) + eos))[0]
        assert token_differences(formatter, head, rollout(tok.encode("Paris.", False))) == (False, False)  # cut


def test_sft_rows_abstain_where_unknowable_and_keep_the_best_supported_answer(checkpoint, sampled):
    """R-Tuning rows: Germany (unknowable) gets the abstention; France and Italy their best sample when it is
    right (regraded here); a knowable prompt never answered right gets no row."""
    lm = lucidlm.load(checkpoint, compile="off")
    prompts = [prompt_of(c) for c in TAUGHT]
    rows, summary = build_sft_rows(lm, prompts, FactsGrading(), SAMPLES, VerifiableRewardConfig(), "I don't know.",
                                   max_new_tokens=14)
    expected = {}
    for country, texts in zip(TAUGHT, sampled):
        meta = prompt_of(country).meta
        if not meta["knowable"]:
            expected[meta["id"]] = "I don't know."
            continue
        rewards = [naive_reward(meta, t) for t in texts]
        if max(rewards) > 0:
            expected[meta["id"]] = texts[rewards.index(max(rewards))].strip()
    assert {r["id"]: r["messages"][-1]["content"] for r in rows} == expected
    assert all(r["messages"][:-1] == list(prompt_of(c).messages) for r, c in zip(rows, TAUGHT))
    assert summary == {"prompts": 3, "rows": 3, "abstentions": 1, "answers": 2, "left_out": 0}
    assert [r["abstention"] for r in rows] == [False, False, True] and {r["type"] for r in rows} == {"country_capital"}
    wrong_only = RLPrompt(messages=prompts[0].messages, meta=prompts[0].meta | {"truth": {"capital": ["Lyon"]}})
    assert build_sft_rows(lm, [wrong_only], FactsGrading(), 2, VerifiableRewardConfig(), "?", 14)[0] == []


def test_balance_repeats_the_fewer_kind_within_each_type_and_shuffles():
    """City: 3 abstentions, 1 answer -> the answer 3 times; element: 1 abstention, 2 answers -> the abstention
    twice; capital: answers only -> kept and named. Counted by hand; the same seed, the same order."""
    def row(name: str, kind: str, abstention: bool) -> dict:
        return {"id": name, "type": kind, "abstention": abstention}
    rows = ([row(f"c{i}", "city", True) for i in range(3)] + [row("c3", "city", False)]
            + [row("e0", "element", True)] + [row(f"e{i}", "element", False) for i in (1, 2)]
            + [row("k0", "capital", False)])
    balanced, summary = balance_by_type(rows, seed=0)
    count = {name: [r["id"] for r in balanced].count(name) for name in {r["id"] for r in rows}}
    assert count == {"c0": 1, "c1": 1, "c2": 1, "c3": 3, "e0": 2, "e1": 1, "e2": 1, "k0": 1}
    assert summary == {"repeated": 3, "unbalanced_types": ["capital"]}
    assert [r["id"] for r in balanced] != [r["id"] for r in rows + [rows[3], rows[3], rows[4]]]  # shuffled
    assert balance_by_type(rows, seed=0)[0] == balanced and balance_by_type(rows, seed=1)[0] != balanced
