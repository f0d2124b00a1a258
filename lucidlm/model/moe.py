"""Mixture of experts (Shazeer 2017; Switch, Fedus 2021; Mixtral; DeepSeekMoE) in the FFN slot.

A router scores every token against every expert; each token goes to its ``top_k`` experts and
their outputs are mixed by the router weights. Pieces, each optional through ``MoEConfig``:

- scoring: softmax over experts (Mixtral, Qwen, DeepSeek-V2) or independent sigmoids
  (DeepSeek-V3); top-1 with softmax is the Switch Transformer;
- noisy top-k: in training, add learned gaussian noise to the logits so more experts get tried;
- group-limited routing (DeepSeek): keep only the best ``topk_groups`` of ``n_groups`` groups;
- a correction bias (DeepSeek-V3's auxiliary-loss-free balancing) that shifts which experts are
  *chosen* without changing the weights they are *mixed* with;
- the load-balancing auxiliary loss E·Σᵢ fᵢ·Pᵢ (fᵢ: share of assignments to expert i, Pᵢ: mean
  router probability of i), lowest when routing is uniform; returned by ``forward``;
- capacity: each expert takes at most ceil(capacity_factor·T·k/E) tokens; the rest are dropped
  for that expert and the token passes through on the residual stream unchanged;
- shared experts that every token uses (DeepSeekMoE, Qwen-MoE), optionally sigmoid-gated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, MoEConfig
from .mlp import MLP


@dataclass
class Routing:
    logits: torch.Tensor  # (tokens, experts), float32
    probs: torch.Tensor  # (tokens, experts): softmax (or normalised sigmoid) scores
    weights: torch.Tensor  # (tokens, top_k): mixing weights of the chosen experts
    experts: torch.Tensor  # (tokens, top_k): indices of the chosen experts


class Router(nn.Module):
    def __init__(self, dim: int, m: MoEConfig) -> None:
        super().__init__()
        self.m = m
        self.weight = nn.Parameter(torch.empty(m.n_experts, dim))
        if m.score_correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(m.n_experts))
        self.noise = nn.Linear(dim, m.n_experts, bias=False) if m.noisy_routing else None

    def forward(self, x: torch.Tensor) -> Routing:
        m = self.m
        logits = F.linear(x.float(), self.weight.float())  # (T, E)
        if self.noise is not None and self.training:
            logits = logits + torch.randn_like(logits) * F.softplus(self.noise(x).float())
        scores = logits.sigmoid() if m.scoring == "sigmoid" else logits.softmax(-1)
        choice = scores
        if m.score_correction_bias:
            choice = scores + self.e_score_correction_bias.float()
        if m.n_groups > 1:
            choice = self._limit_to_groups(choice)
        experts = choice.topk(m.top_k, dim=-1).indices  # (T, k)
        weights = scores.gather(-1, experts)
        if m.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * m.routed_scaling_factor
        probs = scores if m.scoring == "softmax" else scores / scores.sum(-1, keepdim=True)
        return Routing(logits, probs, weights, experts)

    def _limit_to_groups(self, choice: torch.Tensor) -> torch.Tensor:
        m = self.m
        grouped = choice.view(-1, m.n_groups, m.n_experts // m.n_groups)  # (T, G, E/G)
        if m.group_score == "top2_sum":
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        else:
            group_scores = grouped.max(-1).values
        keep = group_scores.topk(m.topk_groups, dim=-1).indices  # (T, topk_groups)
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        expert_mask = group_mask[:, :, None].expand_as(grouped).reshape_as(choice)
        return choice.masked_fill(~expert_mask, float("-inf"))


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch-style auxiliary loss E·Σᵢ fᵢ·Pᵢ, summed over the k routing slots.

    probs: (T, E) router probabilities; experts: (T, k) chosen experts. Uniform routing gives k,
    the minimum (for a fixed k); collapsing onto one expert gives up to k·E.
    """
    chosen = F.one_hot(experts, n_experts).float()  # (T, k, E)
    f = chosen.mean(0)  # (k, E): share of tokens whose slot j went to expert i
    p = probs.mean(0)  # (E,)
    return n_experts * (f * p[None]).sum()


def capacity_keep(experts: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """(T, k) bool: which assignments fit in their expert's capacity (first come, first served,
    with every token's first choice served before any second choice, as in GShard)."""
    T, k = experts.shape
    order = experts.t().reshape(-1)  # slot-major: all first choices, then all second choices
    one_hot = F.one_hot(order, n_experts)  # (k*T, E)
    rank = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # position of each assignment in its expert's queue
    return (rank < capacity).view(k, T).t()


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        m = cfg.moe
        assert m is not None
        self.m = m
        expert_dim = m.expert_ffn_dim or cfg.ffn_dim
        self.gate = Router(cfg.dim, m)
        self.experts = nn.ModuleList(MLP(cfg, expert_dim) for _ in range(m.n_experts))
        self.shared_experts = None
        if m.n_shared_experts:
            self.shared_experts = MLP(cfg, m.shared_ffn_dim or m.n_shared_experts * expert_dim)
        self.shared_expert_gate = nn.Linear(cfg.dim, 1, bias=False) if m.shared_expert_gate else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (batch, seq, dim) -> (output of the same shape, auxiliary loss scalar)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (T, dim)
        r = self.gate(flat)
        keep = torch.ones_like(r.experts, dtype=torch.bool)
        if self.m.capacity_factor is not None:
            capacity = math.ceil(self.m.capacity_factor * flat.shape[0] * self.m.top_k / self.m.n_experts)
            keep = capacity_keep(r.experts, self.m.n_experts, capacity)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where((r.experts == e) & keep)
            if not torch.compiler.is_compiling() and token.numel() == 0:  # compiled: sizes unknown at trace time
                continue
            weight = r.weights[token, slot, None]
            out.index_add_(0, token, (expert(flat[token]) * weight).to(out.dtype))
        if self.shared_experts is not None:
            shared = self.shared_experts(flat)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared
        aux = load_balancing_loss(r.probs, r.experts, self.m.n_experts)
        return out.view(shape), aux
