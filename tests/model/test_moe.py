"""Mixture of experts: routing, mixing, capacity, shared experts and the load-balancing loss, each
against a naive per-token computation written here (and Mixtral's loss in transformers)."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from lucidlm.config import ModelConfig, MoEConfig
from lucidlm.model.masks import build_mask
from lucidlm.model.moe import MoE, Router, capacity_keep, load_balancing_loss
from lucidlm.model.transformer import Block

DIM = 16


def cfg_for(**moe) -> ModelConfig:
    m = MoEConfig(**{**dict(n_experts=8, top_k=2, expert_ffn_dim=12), **moe})
    return ModelConfig(dim=DIM, n_heads=2, vocab_size=16, n_layers=1, ffn_dim=24, max_seq_len=64, moe=m)


def randomized(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
    return module


def naive_route(x: torch.Tensor, router: Router, m: MoEConfig):
    """Per token: scores, (biased) choice, group limit, top-k; returns a list of {expert: weight}."""
    out = []
    for t in range(x.shape[0]):
        logits = [float(x[t] @ router.weight[e].detach()) for e in range(m.n_experts)]
        if m.scoring == "softmax":
            z = sum(math.exp(v) for v in logits)
            scores = [math.exp(v) / z for v in logits]
        else:
            scores = [1 / (1 + math.exp(-v)) for v in logits]
        choice = list(scores)
        if m.score_correction_bias:
            choice = [c + float(router.e_score_correction_bias[e]) for e, c in enumerate(choice)]
        allowed = set(range(m.n_experts))
        if m.n_groups > 1:
            size = m.n_experts // m.n_groups
            groups = [sorted(choice[g * size:(g + 1) * size], reverse=True) for g in range(m.n_groups)]
            gscore = [g[0] if m.group_score == "max" else g[0] + g[1] for g in groups]
            best = sorted(range(m.n_groups), key=lambda g: -gscore[g])[: m.topk_groups]
            allowed = {e for e in allowed if e // size in best}
        chosen = sorted(allowed, key=lambda e: -choice[e])[: m.top_k]
        w = {e: scores[e] for e in chosen}
        if m.norm_topk_prob:
            total = sum(w.values())
            w = {e: v / total for e, v in w.items()}
        out.append({e: v * m.routed_scaling_factor for e, v in w.items()})
    return out


def assert_routing_equals_naive(r, naive):
    for t, expect in enumerate(naive):
        got = dict(zip(r.experts[t].tolist(), r.weights[t].tolist(), strict=True))
        assert set(got) == set(expect), f"token {t}"
        for e in expect:
            assert got[e] == pytest.approx(expect[e], rel=1e-4, abs=1e-6)


ROUTING = {
    "softmax": dict(),
    "softmax_top1_switch": dict(top_k=1),
    "softmax_unnormalised_scaled": dict(norm_topk_prob=False, routed_scaling_factor=2.5),
    "sigmoid": dict(scoring="sigmoid"),
    "groups_max": dict(n_groups=4, topk_groups=2, group_score="max", norm_topk_prob=False),
    "groups_top2_sum": dict(scoring="sigmoid", n_groups=4, topk_groups=2, group_score="top2_sum", top_k=3),
}


@pytest.mark.parametrize("case", sorted(ROUTING))
def test_router_equals_naive(case):
    cfg = cfg_for(**ROUTING[case])
    router = randomized(Router(DIM, cfg.moe))
    x = torch.randn(40, DIM)
    r = router(x)
    assert r.experts.shape == r.weights.shape == (40, cfg.moe.top_k)
    assert_routing_equals_naive(r, naive_route(x, router, cfg.moe))


def test_softmax_and_sigmoid_scoring_differ_in_weights_and_probs():
    x = torch.randn(20, DIM)
    soft = randomized(Router(DIM, cfg_for(norm_topk_prob=False).moe))
    sig = Router(DIM, cfg_for(scoring="sigmoid", norm_topk_prob=False).moe)
    sig.load_state_dict(soft.state_dict())
    rs, rg = soft(x), sig(x)
    assert torch.equal(rs.experts, rg.experts)  # both monotone in the logit: same choice
    torch.testing.assert_close(rs.weights, rs.logits.softmax(-1).gather(-1, rs.experts))
    torch.testing.assert_close(rg.weights, rg.logits.sigmoid().gather(-1, rg.experts))
    torch.testing.assert_close(rs.probs.sum(-1), torch.ones(20))
    torch.testing.assert_close(rg.probs, rg.logits.sigmoid() / rg.logits.sigmoid().sum(-1, keepdim=True))


@pytest.mark.parametrize("group_score", ["max", "top2_sum"])
def test_group_limited_routing_only_picks_from_top_groups(group_score):
    m = cfg_for(n_groups=4, topk_groups=2, group_score=group_score, top_k=3, scoring="sigmoid").moe
    router = randomized(Router(DIM, m))
    x = torch.randn(64, DIM)
    r = router(x)
    scores = torch.sigmoid(x @ router.weight.T).view(64, 4, 2)
    gs = scores.max(-1).values if group_score == "max" else scores.sum(-1)  # 2 experts per group: top2 = sum
    top_groups = gs.topk(2, dim=-1).indices
    for t in range(64):
        assert set((r.experts[t] // 2).tolist()) <= set(top_groups[t].tolist())
    unrestricted = (x @ router.weight.T).topk(3, dim=-1).indices
    assert not torch.equal(r.experts.sort(-1).values, unrestricted.sort(-1).values)  # the limit did bite


def test_correction_bias_changes_choice_but_not_weight_source():
    m = cfg_for(scoring="sigmoid", score_correction_bias=True).moe
    router = randomized(Router(DIM, m))
    x = torch.randn(30, DIM)
    before = router(x)
    assert not (before.experts == 7).any(dim=-1).all()
    router.e_score_correction_bias[7] = 10.0
    after = router(x)
    assert (after.experts == 7).any(dim=-1).all()  # the bias forces expert 7 into every choice
    scores = torch.sigmoid(x @ router.weight.T)  # weights come from the unbiased scores
    expected = scores.gather(-1, after.experts)
    torch.testing.assert_close(after.weights, expected / expected.sum(-1, keepdim=True))
    assert_routing_equals_naive(after, naive_route(x, router, m))
    assert "e_score_correction_bias" in router.state_dict()  # a checkpoint buffer, not a parameter
    assert all("bias" not in n for n, _ in router.named_parameters())


def test_moe_output_equals_naive_per_token_loop():
    cfg = cfg_for()
    moe = randomized(MoE(cfg))
    x = torch.randn(2, 9, DIM)
    out, _ = moe(x)
    flat = x.reshape(-1, DIM)
    routes = naive_route(flat, moe.gate, cfg.moe)
    expected = torch.stack([sum(w * moe.experts[e](flat[t]) for e, w in routes[t].items())
                            for t in range(flat.shape[0])])
    torch.testing.assert_close(out.reshape(-1, DIM), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gated", [False, True])
def test_shared_experts_and_their_gate(gated):
    cfg = cfg_for(n_shared_experts=2, shared_expert_gate=gated)
    moe = randomized(MoE(cfg))
    assert moe.shared_experts.down_proj.in_features == 2 * 12
    x = torch.randn(1, 6, DIM)
    out, _ = moe(x)
    flat = x[0]
    routes = naive_route(flat, moe.gate, cfg.moe)
    for t in range(6):
        routed = sum(w * moe.experts[e](flat[t]) for e, w in routes[t].items())
        shared = moe.shared_experts(flat[t])
        if gated:
            shared = torch.sigmoid(flat[t] @ moe.shared_expert_gate.weight[0]) * shared
        torch.testing.assert_close(out[0, t], routed + shared, rtol=1e-4, atol=1e-5)


# --- load-balancing loss --------------------------------------------------------------------
def routed(logits: torch.Tensor, k: int):
    probs = logits.softmax(-1)
    return probs, probs.topk(k, dim=-1).indices


@pytest.mark.parametrize("k", [1, 2])
def test_aux_loss_is_top_k_for_uniform_routing_and_larger_when_skewed(k):
    E = 8
    uniform = torch.zeros(E, E)  # token t prefers experts t, t+1: every expert equally used and probable
    for t in range(E):
        uniform[t, t], uniform[t, (t + 1) % E] = 5.0, 4.0
    skewed = torch.zeros(E, E)
    skewed[:, 0], skewed[:, 1] = 5.0, 4.0  # everyone prefers experts 0 and 1
    lu = load_balancing_loss(*routed(uniform, k), E)
    ls = load_balancing_loss(*routed(skewed, k), E)
    assert float(lu) == pytest.approx(k, rel=1e-6)
    assert ls > lu + 1
    random_ = load_balancing_loss(*routed(torch.randn(64, E) * 3, k), E)
    assert lu < random_ < ls
    collapse = torch.full((16, E), -30.0)
    collapse[:, 0] = 30.0
    assert float(load_balancing_loss(*routed(collapse, 1), E)) == pytest.approx(E, rel=1e-4)  # the maximum, k·E


@pytest.mark.parametrize("k", [1, 2, 3])
def test_aux_loss_equals_mixtral(k):
    E = 8
    for logits in (torch.randn(50, E), torch.randn(50, E) * 4 + torch.arange(E) * 0.5):
        ours = load_balancing_loss(*routed(logits, k), E)
        theirs = load_balancing_loss_func((logits,), E, k)
        torch.testing.assert_close(ours, theirs)


def test_moe_forward_returns_mixtral_aux_loss_of_its_router():
    cfg = cfg_for()
    moe = randomized(MoE(cfg))
    x = torch.randn(3, 7, DIM)
    _, aux = moe(x)
    logits = x.reshape(-1, DIM) @ moe.gate.weight.T
    torch.testing.assert_close(aux, load_balancing_loss_func((logits,), 8, 2))


# --- capacity --------------------------------------------------------------------------------
def naive_capacity_keep(experts: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    T, k = experts.shape
    keep = torch.zeros(T, k, dtype=torch.bool)
    used = [0] * n_experts
    for slot in range(k):  # every first choice before any second choice
        for t in range(T):
            e = int(experts[t, slot])
            if used[e] < capacity:
                keep[t, slot] = True
                used[e] += 1
    return keep


def test_capacity_keep_serves_first_choices_before_second_choices():
    experts = torch.tensor([[1, 0], [0, 2], [0, 1]])  # token 0's second choice competes with tokens 1, 2
    keep = capacity_keep(experts, 3, capacity=1)
    assert torch.equal(keep, torch.tensor([[True, False], [True, True], [False, False]]))
    # expert 0: token 1's first choice is served; token 2's first choice and token 0's second are over capacity


@pytest.mark.parametrize("capacity", [1, 2, 5, 100])
def test_capacity_keep_equals_naive_and_respects_capacity(capacity):
    experts = torch.stack([torch.randperm(6)[:3] for _ in range(20)])
    keep = capacity_keep(experts, 6, capacity)
    assert torch.equal(keep, naive_capacity_keep(experts, 6, capacity))
    for e in range(6):
        assert int(((experts == e) & keep).sum()) == min(capacity, int((experts == e).sum()))


def test_over_capacity_tokens_pass_through_the_block_unchanged():
    cfg = cfg_for(capacity_factor=0.1).replace(positions="none")
    block = randomized(Block(cfg, 0))
    x = torch.randn(2, 12, DIM)
    mask = build_mask(12, 12, batch=2)
    out, aux = block(x, None, mask)
    h = x + block.attn(block.attn_norm(x), None, mask)  # residual after attention
    flat = block.mlp_norm(h).reshape(-1, DIM)
    r = block.mlp.gate(flat)
    capacity = math.ceil(0.1 * 24 * 2 / 8)
    assert capacity == 1
    keep = naive_capacity_keep(r.experts, 8, capacity)
    dropped = ~keep.any(-1)
    assert dropped.sum() >= 10  # at most 8 assignments fit
    moe_out, _ = block.mlp(block.mlp_norm(h))
    assert (moe_out.reshape(-1, DIM)[dropped] == 0).all()
    assert torch.equal(out.reshape(-1, DIM)[dropped], h.reshape(-1, DIM)[dropped])
    # kept assignments still flow: the tokens that got their expert are changed
    assert not torch.allclose(out.reshape(-1, DIM)[~dropped], h.reshape(-1, DIM)[~dropped])
    # and the kept tokens equal the naive mix of only their kept experts
    normed = block.mlp_norm(h).reshape(-1, DIM)
    for t in torch.where(~dropped)[0].tolist():
        mix = sum(r.weights[t, j] * block.mlp.experts[int(r.experts[t, j])](normed[t])
                  for j in range(2) if keep[t, j])
        torch.testing.assert_close(out.reshape(-1, DIM)[t], h.reshape(-1, DIM)[t] + mix)


# --- noisy routing ---------------------------------------------------------------------------
def test_noisy_routing_adds_noise_only_in_training():
    m = cfg_for(noisy_routing=True).moe
    router = randomized(Router(DIM, m))
    x = torch.randn(32, DIM)
    clean = x @ router.weight.T
    router.eval()
    torch.testing.assert_close(router(x).logits, clean)
    router.train()
    a, b = router(x).logits, router(x).logits
    assert not torch.allclose(a, clean) and not torch.allclose(a, b)
    # noise std is softplus(W_noise x), per token and expert
    std = F.softplus(x @ router.noise.weight.T)
    draws = torch.stack([router(x).logits - clean for _ in range(400)])
    torch.testing.assert_close(draws.std(0).mean(), std.mean(), rtol=0.05, atol=0)
    noiseless = Router(DIM, cfg_for().moe)
    noiseless.load_state_dict(router.state_dict(), strict=False)
    noiseless.train()
    torch.testing.assert_close(noiseless(x).logits, clean)  # without the option, training is deterministic
