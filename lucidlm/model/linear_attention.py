"""Kernelized linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

Softmax attention weighs key j for query i by exp(q_i·k_j); linear attention replaces that similarity by a
kernel φ(q_i)·φ(k_j) with the positive feature map φ(x) = elu(x) + 1. Causal:

    out_i = φ(q_i)ᵀ S_i / (φ(q_i)ᵀ z_i + eps),   S_i = Σ_{j≤i} φ(k_j) v_jᵀ  (d × dv),   z_i = Σ_{j≤i} φ(k_j)  (d)

Taking the product in the order φ(q)ᵀ(φ(K)ᵀV) instead of (φ(q)ᵀφ(K)ᵀ)V is the notes' point: O(N·d²) instead of
O(N²·d). Three computations of that one formula, equal up to rounding:

- ``linear_attention_masked``: the parallel form with a causal mask over φ(Q)φ(K)ᵀ — O(N²) like softmax
  attention (no exp, no max), the definition to check the others against;
- ``linear_attention_chunked``: the chunkwise parallel form training uses — within a chunk of C positions the
  masked form, across chunks the running sums (S, z) taken at chunk boundaries: O(N·C·d + (N/C)·d²) memory;
- ``linear_attention_recurrent``: the RNN — (S, z) updated token by token (``recurrent_step``), O(d²) per token
  whatever the length. The state (S, z) is what a KV cache holds for this kind: constant size per sequence.

All three take an optional starting state, so a cached forward continues a sequence (chunked prefill, decode).
The sums run in float32 whatever the model's dtype: S grows with the length, and bfloat16's 8-bit mantissa
would stop adding to it after a few hundred tokens.

Shapes: φ(q) (batch, heads, n, d); φ(k) (batch, kv_heads, n, d); v (batch, kv_heads, n, dv); with grouped
key/value heads (GQA) the state is per kv head — (batch, kv_heads, d, dv) and (batch, kv_heads, d) — and the
query heads of a group read the same one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import Attention
from .kv_cache import KVCache

EPS = 1e-6  # the reference implementation's (fast-transformers' CausalLinearAttention) normaliser epsilon
CHUNK = 64  # positions per chunk of the chunked form: the masked part is C × C per chunk

State = tuple[torch.Tensor, torch.Tensor]  # S (batch, kv_heads, d, dv), z (batch, kv_heads, d)


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """φ(x) = elu(x) + 1: positive everywhere, so the weights φ(q)·φ(k) are positive and normalisable."""
    return F.elu(x) + 1


def _grouped(phi_q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(b, h, n, d) -> (b, kv_heads, group, n, d): the query heads that share one key/value head."""
    b, h, n, d = phi_q.shape
    return phi_q.view(b, kv_heads, h // kv_heads, n, d)


def _empty_state(phi_k: torch.Tensor, v: torch.Tensor) -> State:
    b, kv, _, d = phi_k.shape
    return phi_k.new_zeros(b, kv, d, v.shape[-1]), phi_k.new_zeros(b, kv, d)


def linear_attention_masked(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor,
                            mask: torch.Tensor | None = None) -> torch.Tensor:
    """out = (A ⊙ M) V / ((A ⊙ M) 1 + eps) with A = φ(Q) φ(K)ᵀ; M: bool (batch, 1, n, n), default causal."""
    q = _grouped(phi_q, phi_k.shape[1])  # (b, kv, g, n, d)
    scores = q @ phi_k[:, :, None].transpose(-1, -2)  # (b, kv, g, n, n)
    n = phi_q.shape[-2]
    if mask is None:
        mask = torch.ones(n, n, dtype=torch.bool, device=phi_q.device).tril()
    else:
        mask = mask[:, :, None]  # (b, 1, 1, n, n) over kv heads and groups
    scores = scores.masked_fill(~mask, 0)
    out = (scores @ v[:, :, None]) / (scores.sum(-1, keepdim=True) + EPS)  # (b, kv, g, n, dv)
    return out.flatten(1, 2)


def recurrent_step(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, state: State) -> tuple[torch.Tensor,
                                                                                                   State]:
    """One token: S += φ(k) vᵀ, z += φ(k), out = φ(q)ᵀS / (φ(q)ᵀz + eps). φ(q) (b, h, d); φ(k) (b, kv, d);
    v (b, kv, dv). Returns out (b, h, dv) and the new state."""
    s, z = state
    s = s + phi_k[..., :, None] * v[..., None, :]  # (b, kv, d, dv)
    z = z + phi_k
    b, h, d = phi_q.shape
    q = phi_q.view(b, z.shape[1], h // z.shape[1], d)  # (b, kv, g, d)
    num = torch.einsum("bkgd,bkde->bkge", q, s)
    den = torch.einsum("bkgd,bkd->bkg", q, z)
    return (num / (den[..., None] + EPS)).reshape(b, h, -1), (s, z)


def linear_attention_recurrent(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor,
                               state: State | None = None) -> tuple[torch.Tensor, State]:
    """The RNN form, one ``recurrent_step`` per position: out (b, h, n, dv) and the state after the last."""
    state = _empty_state(phi_k, v) if state is None else state
    outs = []
    for i in range(phi_q.shape[-2]):
        out, state = recurrent_step(phi_q[:, :, i], phi_k[:, :, i], v[:, :, i], state)
        outs.append(out)
    return torch.stack(outs, dim=2), state


def linear_attention_chunked(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor,
                             state: State | None = None, chunk: int = CHUNK) -> tuple[torch.Tensor, State]:
    """The chunkwise parallel form: out (b, h, n, dv) and the state after the last position.

    Per chunk c: out = [φ(Q_c) S_<c + masked(φ(Q_c) φ(K_c)ᵀ) V_c] / [φ(Q_c) z_<c + masked(...) 1 + eps], where
    (S_<c, z_<c) sum every earlier chunk (plus ``state``): an exclusive cumulative sum over chunk totals.
    """
    s0, z0 = _empty_state(phi_k, v) if state is None else state
    b, kv, n, d = phi_k.shape
    chunk = min(chunk, n)
    pad = -n % chunk  # zero keys and values at the end add nothing to any sum; their queries are cut off
    if pad:
        phi_q, phi_k, v = (F.pad(t, (0, 0, 0, pad)) for t in (phi_q, phi_k, v))
    n_chunks = (n + pad) // chunk
    q = _grouped(phi_q, kv).unflatten(3, (n_chunks, chunk))  # (b, kv, g, nc, C, d)
    k = phi_k.unflatten(2, (n_chunks, chunk))  # (b, kv, nc, C, d)
    vc = v.unflatten(2, (n_chunks, chunk))  # (b, kv, nc, C, dv)

    kv_sums = k.transpose(-1, -2) @ vc  # Σ_{j in chunk} φ(k_j) v_jᵀ: (b, kv, nc, d, dv)
    k_sums = k.sum(-2)  # (b, kv, nc, d)
    s_before = s0[:, :, None] + _exclusive_cumsum(kv_sums)  # state entering each chunk
    z_before = z0[:, :, None] + _exclusive_cumsum(k_sums)

    scores = (q @ k[:, :, None].transpose(-1, -2)).tril()  # within-chunk causal: (b, kv, g, nc, C, C)
    num = q @ s_before[:, :, None] + scores @ vc[:, :, None]  # (b, kv, g, nc, C, dv)
    den = (q @ z_before[:, :, None, :, :, None]).squeeze(-1) + scores.sum(-1)  # (b, kv, g, nc, C)
    out = (num / (den[..., None] + EPS)).flatten(3, 4).flatten(1, 2)[:, :, :n]  # (b, h, n, dv)
    return out, (s_before[:, :, -1] + kv_sums[:, :, -1], z_before[:, :, -1] + k_sums[:, :, -1])


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    """Sums over the chunks before each one (dim 2): 0, x0, x0 + x1, ..."""
    return torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, :-1].cumsum(2)], dim=2)


def real_keys_from_mask(mask: torch.Tensor | None, batch: int, n: int, device: torch.device) -> torch.Tensor:
    """Which keys are real tokens (batch, n), read from a causal padding mask (masks.build_mask): the last query's
    row allows every real key. (Its own key is always allowed, even if it is padding; that key reaches only the
    last query, whose output is then padding's and ignored.)"""
    if mask is None:
        return torch.ones(batch, n, dtype=torch.bool, device=device)
    return mask[:, 0, -1, :].expand(batch, n)


class LinearAttention(Attention):
    """``Attention``'s projections (q/k/v/o, QK-norm, output gate) around linear attention instead of softmax.

    Without a cache: the chunked form over the sequence. With one: the cache holds (S, z) per slot and layer
    (``KVCache.read_state`` / ``write_state``); a prefill chunk or decode step continues it with the chunked form.
    Padding keys are zeroed (torch.where, so no NaN from a padded position can leak into the sums).
    """

    def forward(
        self,
        x: torch.Tensor,  # (batch, seq, dim)
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        bias: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        if rope is not None or bias is not None:
            raise ValueError("linear attention takes no RoPE tables or ALiBi bias (ModelConfig.attention='linear')")
        b, s, _ = x.shape
        q, k, v = self.heads(x, None)  # (b, h, s, hd), (b, kv, s, hd) x 2
        phi_q, phi_k, v32 = feature_map(q.float()), feature_map(k.float()), v.float()
        real = cache.new_tokens_real() if cache is not None else real_keys_from_mask(mask, b, s, x.device)
        phi_k = torch.where(real[:, None, :, None], phi_k, 0.0)
        v32 = torch.where(real[:, None, :, None], v32, 0.0)
        state = cache.read_state(self.layer) if cache is not None else None
        out, state = linear_attention_chunked(phi_q, phi_k, v32, state)
        if cache is not None:
            cache.write_state(self.layer, state)
        return self.merge_heads(out.to(x.dtype), x)
