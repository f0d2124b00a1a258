"""The probe reward against two independent references: −max (and −mean) of the probe's sigmoid(w·h + b)
recomputed naively on each rollout alone (no padding, no batching, the alignment by hand), and the scores
the engine gives while generating (lowest_max_score of the Completion); the frozen copy does not follow the
policy's weights, the policy scorer does."""

from __future__ import annotations

import pytest
import torch
from tiny_lm import random_probe, tiny_lm

from lucidlm.apps.rl_probe_reward import ProbeReward, ProbeRewardConfig
from lucidlm.probe.probe import save_probe
from lucidlm.probe.selective import lowest_max_score
from lucidlm.train.rewards import RLPrompt, Rollout

PROMPT = RLPrompt(text="q")


pytestmark = pytest.mark.usefixtures("one_thread")


def naive_scores(lm, probe, prompt_ids, token_ids) -> list[float]:
    """Each response token's score from its own forward over prompt + response alone."""
    ids = torch.tensor([list(prompt_ids) + list(token_ids)])
    hidden = lm.model.forward_outputs(ids, hidden_layers=[probe.config.layer]).hidden_states[probe.config.layer][0]
    w, b = probe.head.linear.weight[0], probe.head.linear.bias[0]
    out = []
    for t in range(len(prompt_ids), ids.shape[1]):
        h = hidden[t] if probe.config.alignment == "own" else hidden[t - 1]
        out.append(float(torch.sigmoid(h @ w + b)))
    return out


@pytest.mark.parametrize("alignment", ["own", "predictive"])
@torch.no_grad()
def test_probe_reward_is_minus_the_max_score_of_the_response_tokens(alignment):
    lm = tiny_lm()
    probe = random_probe(lm, layer=1, alignment=alignment)
    g = torch.Generator().manual_seed(0)
    rollouts = [Rollout(PROMPT, tuple(torch.randint(0, 256, (n,), generator=g).tolist()),
                        tuple(torch.randint(0, 256, (m,), generator=g).tolist()), "x", "stop")
                for n, m in ((5, 7), (9, 2), (3, 11))]
    rollouts.append(Rollout(PROMPT, (1, 2, 3), (), "", "stop"))
    naive = [naive_scores(lm, probe, r.prompt_ids, r.token_ids) for r in rollouts]
    maxed = ProbeReward(lm.model, probe, 258, ProbeRewardConfig(batch_size=2))(rollouts)
    assert maxed[:3] == pytest.approx([-max(s) for s in naive[:3]], abs=1e-5)
    assert maxed[3] == -1.0  # an empty response: the worst score
    mean = ProbeReward(lm.model, probe, 258, ProbeRewardConfig(reduce="mean", abstain_bonus=0.5))
    texts = [Rollout(r.prompt, r.prompt_ids, r.token_ids, t, "stop")
             for r, t in zip(rollouts[:2], ("I don't know.", "Paris"))]
    assert mean(texts) == pytest.approx([-sum(naive[0]) / 7 + 0.5, -sum(naive[1]) / 2], abs=1e-5)


@pytest.mark.parametrize("alignment", ["own", "predictive"])
def test_probe_reward_equals_the_scores_of_generation(alignment):
    lm = tiny_lm()
    lm.probe = random_probe(lm, layer=0, alignment=alignment)
    prompts = [lm.encode("hello there"), lm.encode("a longer prompt")]
    done = lm.generate(prompts, max_new_tokens=8, ignore_eos=True)
    rollouts = [Rollout(PROMPT, tuple(p), tuple(c.token_ids), c.text, c.finish_reason) for p, c in zip(prompts, done)]
    reward = ProbeReward(lm.model, lm.probe, 258)
    assert reward(rollouts) == pytest.approx([lowest_max_score(c) for c in done], abs=1e-4)


def test_frozen_scorer_keeps_the_model_it_was_made_with(tmp_path):
    lm = tiny_lm()
    probe = random_probe(lm, layer=1)
    save_probe(tmp_path / "probe", probe.head, probe.config, lm.model)
    rollouts = [Rollout(PROMPT, (5, 6, 7), (8, 9, 10, 11), "x", "stop")]
    frozen = ProbeReward.from_directory(lm, tmp_path / "probe")
    policy = ProbeReward.from_directory(lm, tmp_path / "probe", ProbeRewardConfig(scorer="policy"))
    before = frozen(rollouts)
    assert policy(rollouts) == pytest.approx(before, abs=1e-6)
    with torch.no_grad():
        lm.model.blocks[0].mlp.down_proj.weight.mul_(3.0)  # the policy moves
    assert frozen(rollouts) == before
    assert policy(rollouts) != pytest.approx(before, abs=1e-4)
    with pytest.raises(ValueError, match="max_seq_len"):
        frozen([Rollout(PROMPT, (1,) * lm.config.max_seq_len, (2,), "x", "length")])
    with pytest.raises(ValueError, match="reduce"):
        ProbeRewardConfig(reduce="median")
