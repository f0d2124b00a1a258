"""``lucidlm rl-eval --probe``: each claim span's score against a naive recomputation (the probe's head on the hidden
states of a plain forward of prompt + completion alone, the span's tokens found from its bytes), the AUROC against
sklearn's, the tokens of real generations read back as the engine's text, and the probe's model check before any
answer is generated."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from tiny_lm import random_probe, tiny_lm
from typer.testing import CliRunner

from lucidlm.apps import rl_eval
from lucidlm.apps.cli import app
from lucidlm.apps.rl_eval import METRICS, evaluate, metrics_table
from lucidlm.apps.rl_probe_eval import token_offsets
from lucidlm.apps.rl_prompts import world_rl_prompts
from lucidlm.checkpoint import FAMILIES, save_model
from lucidlm.probe.probe import ProbeError, save_probe
from lucidlm.random_checkpoint import CHAT_TEMPLATE
from lucidlm.train.rewards import RLPrompt, Rollout
from lucidlm.world.build import WorldConfig, build_world, read_people
from lucidlm.world.texts import answer, answer_prefix

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    build_world(out, WorldConfig(seed=0, people=8))
    return out


def saved_probe(lm, path, layer: int = 1, alignment: str = "own", seed: int = 0):
    probe = random_probe(lm, layer, alignment, seed)
    save_probe(path, probe.head, probe.config, lm.model)
    return probe


def crafted(world, lm) -> list[tuple[Rollout, str]]:
    """Per person, a forced-prefix prompt and, as the completion's own tokens, the world's answer after the prefix
    (leading space, a second line the grader never reads), every other one with a wrong year and a birthplace
    of two-byte characters; an EOS closes each."""
    people = read_people(world)
    out = []
    for i, p in enumerate(world_rl_prompts(world, "all")):
        person = people[p.meta["name"]]
        prefix = answer_prefix(person)
        text = answer(person)[len(prefix):]
        if i % 2:
            text = text.replace(str(person.birth_year), str(person.birth_year + 3)).replace(person.birthplace,
                                                                                            "Montréal Süd")
        text += "\nMore é."
        prompt = RLPrompt(text=p.meta["name"] + "?\nA: " + prefix, meta=p.meta | {"prefix": prefix})
        ids = lm.encode(prompt.text)
        out.append((Rollout(prompt, tuple(ids), tuple(lm.encode(text, False)) + (lm.tokenizer.eos_token_id,),
                            text, "stop"), "greedy"))
    return out


@torch.no_grad()
def naive_span(lm, probe, rollout: Rollout, start: int, end: int) -> tuple[float, float]:
    """(max probe score, max token NLL) over completion tokens [start, end), from one forward of this rollout."""
    ids = torch.tensor([list(rollout.prompt_ids) + list(rollout.token_ids)])
    out = lm.model.forward_outputs(ids, hidden_layers=[probe.config.layer])
    hidden, logp = out.hidden_states[probe.config.layer][0], torch.log_softmax(out.logits[0].float(), -1)
    w, b = probe.head.linear.weight[0], probe.head.linear.bias[0]
    scores, nll = [], []
    for t in range(len(rollout.prompt_ids) + start, len(rollout.prompt_ids) + end):
        h = hidden[t] if probe.config.alignment == "own" else hidden[t - 1]
        scores.append(float(torch.sigmoid(h @ w + b)))
        nll.append(float(-logp[t - 1, ids[0, t]]))
    return max(scores), max(nll)


@pytest.mark.parametrize("alignment", ["own", "predictive"])
def test_span_scores_are_the_probe_on_the_completions_own_tokens(world, tmp_path, monkeypatch, alignment):
    lm = tiny_lm()
    probe = saved_probe(lm, tmp_path / "probe", alignment=alignment)
    answers = crafted(world, lm)
    monkeypatch.setattr(rl_eval, "sampled_rollouts", lambda *a, **k: answers)
    rows, metrics = evaluate(lm, [r.prompt for r, _ in answers], f"world:{world}", probe=tmp_path / "probe")
    scores, labels, groups = [], [], []
    for row, (rollout, _) in zip(rows, answers):
        assert [s["span"] for s in row["probe_spans"]] == [a["span"] for a in row["annotations"]]
        assert len(row["annotations"]) == 7  # every attribute, none in the forced prefix
        for s, a in zip(row["probe_spans"], row["annotations"]):
            at = a["index"] - len(rollout.prompt.meta["prefix"])  # answer = prefix + text (nothing stripped)
            assert rollout.text[at:at + len(a["span"])] == a["span"]
            start = len(rollout.text[:at].encode())  # the byte tokenizer: one token per byte
            end = start + len(a["span"].encode())
            assert s["tokens"] == [start, end]
            assert lm.decode(list(rollout.token_ids[start:end])) == a["span"]
            expected = naive_span(lm, probe, rollout, start, end)
            assert (s["probe"], s["nll"]) == pytest.approx(expected, abs=1e-5)
            scores.append(expected)
            labels.append(int(a["label"] == "Not Supported"))
            groups.append(row["entity"])
    assert 0 < sum(labels) < len(labels)
    scores = np.array(scores)
    for k, method in enumerate(("probe", "nll")):
        m = metrics[f"{method}_auroc"]
        assert m["value"] == pytest.approx(roc_auc_score(labels, scores[:, k]), abs=1e-9)
        assert m["lo"] <= m["value"] <= m["hi"]
        assert (m["n"], m["positives"], m["entities"]) == (len(labels), sum(labels), len(set(groups)))
    assert metrics["probe_spans"]["value"] == len(labels) and metrics["probe_unscored"]["value"] == 0
    table = metrics_table({"before": {k: v for k, v in metrics.items() if "probe" not in k}, "after": metrics})
    assert f"| probe_auroc | — | {metrics['probe_auroc']['value']:.3f} [" in table  # the run without a probe: —
    assert "| probe_unscored | — | 0 |" in table
    again = rl_eval.probe_metrics(json.loads(json.dumps(rows)))  # the rows written recompute the table
    assert json.dumps(again) == json.dumps({k: metrics[k] for k in again})


def test_real_generations_read_back_as_the_engines_text(world, tmp_path):
    lm = tiny_lm()
    saved_probe(lm, tmp_path / "probe", layer=0)
    prompts = [RLPrompt(text="Who is " + p.meta["name"] + "?\nA:", meta=p.meta | {"stop": ["."]})
               for p in world_rl_prompts(world, "all")[:4]]
    pieces = lm.encode("aé", False) + [lm.tokenizer.eos_token_id]  # é: two bytes, one character; EOS: no text
    assert token_offsets(lm.tokenizer, pieces) == ([(0, 1), (1, 2), (1, 2), (2, 2)], "aé")
    answers = rl_eval.sampled_rollouts(lm, prompts, 2, 12)
    for rollout, _ in answers:  # random bytes: partial UTF-8 characters, stop strings cut mid-token
        offsets, text = token_offsets(lm.tokenizer, rollout.token_ids)
        assert text.startswith(rollout.text) and len(offsets) == len(rollout.token_ids)
    rows, metrics = evaluate(lm, prompts, f"world:{world}", samples=2, max_new_tokens=12, probe=tmp_path / "probe")
    assert [len(r["probe_spans"]) for r in rows] == [len(r["annotations"]) for r in rows]
    assert {"probe_auroc", "nll_auroc", "probe_spans"} <= set(metrics)


def test_a_probe_for_another_model_is_refused_before_any_answer(world, tmp_path, monkeypatch):
    other = tiny_lm(seed=1)  # the same shape, other weights
    saved_probe(other, tmp_path / "probe")
    monkeypatch.setattr(rl_eval, "sampled_rollouts", lambda *a, **k: pytest.fail("generated before the check"))
    with pytest.raises(ProbeError, match="made for another model"):
        evaluate(tiny_lm(), world_rl_prompts(world, "all"), f"world:{world}", probe=tmp_path / "probe")


def test_the_cli_table_without_a_probe_is_as_before_and_with_one_adds_its_rows(world, tmp_path):
    lm = tiny_lm()
    model = lm.model
    save_model(model, tmp_path / "m", FAMILIES["llama"])
    lm.tokenizer.save(tmp_path / "m")
    (tmp_path / "m" / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    saved_probe(lm, tmp_path / "probe")
    saved_probe(tiny_lm(seed=1), tmp_path / "other")
    runner = CliRunner()
    prompts = tmp_path / "p.jsonl"
    assert runner.invoke(app, ["rl-prompts", "--world", str(world), "--split", "eval", "--out", str(prompts)]
                         ).exit_code == 0
    base = ["rl-eval", "-m", str(tmp_path / "m"), "--prompts", str(prompts), "--grader", f"world:{world}",
            "--samples", "1", "--max-new-tokens", "4", "--out", str(tmp_path / "rows.json")]
    plain = runner.invoke(app, base)
    assert plain.exit_code == 0, plain.output
    table = [line.split(" |")[0] for line in plain.output.splitlines() if line.startswith("| ")]
    assert table == ["| metric"] + [f"| {m}" for m in METRICS[:5]]  # the five rows of before, nothing more
    probed = runner.invoke(app, base + ["--probe", str(tmp_path / "probe")])
    assert probed.exit_code == 0, probed.output
    assert [line.split(" |")[0] for line in probed.output.splitlines() if line.startswith("| ")] == \
        ["| metric"] + [f"| {m}" for m in METRICS]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert all("probe_spans" in r for r in rows)
    refused = runner.invoke(app, base + ["--probe", str(tmp_path / "other")])
    assert isinstance(refused.exception, ProbeError)
