"""Model configuration: one dataclass that says what the network is, plus named presets.

Every architectural choice is an explicit field (no behaviour inferred from a model's name), so a
config read from a Hugging Face ``config.json`` and a config written by hand describe models the
same way. ``from_preset(name, **overrides)`` builds both real-sized and tiny test models.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

# Sizes far beyond any real model (the largest have ~128 layers, dim 16384, a 256k vocabulary, 384 experts):
# a config past them is damaged or hostile, and building it would take minutes before anything failed.
MAX_SIZES = {"vocab_size": 1 << 22, "dim": 1 << 17, "n_layers": 1024, "n_heads": 1024, "n_kv_heads": 1024,
             "head_dim": 1 << 13, "ffn_dim": 1 << 20, "max_seq_len": 1 << 24, "sliding_window": 1 << 24}
MAX_NESTED_SIZES = {"n_experts": 1 << 12, "expert_ffn_dim": 1 << 20, "shared_ffn_dim": 1 << 20,
                    "n_shared_experts": 64, "kv_lora_rank": 1 << 16, "q_lora_rank": 1 << 16,
                    "qk_nope_head_dim": 1 << 13, "qk_rope_head_dim": 1 << 13, "v_head_dim": 1 << 13}
MAX_EXPERT_MODULES = 1 << 16  # layers x experts: each expert is a module to build
MAX_EOS_IDS = 1024  # real checkpoints list a handful
MAX_SPARSE_BLOCKS = 1 << 13  # a block-sparse layout is blocks x blocks booleans

PositionKind = Literal["rope", "alibi", "sinusoidal", "learned", "relative_bias", "none"]
NormKind = Literal["rmsnorm", "layernorm"]
NormPlacement = Literal["pre", "post", "sandwich", "deepnorm"]  # deepnorm: model/deepnorm.py
Activation = Literal["silu", "gelu", "gelu_tanh", "relu"]
RopeType = Literal["default", "linear", "ntk", "dynamic", "yarn", "llama3", "ntk_by_parts"]
AttentionKind = Literal["softmax", "linear"]
SparsePattern = Literal["local_global", "block_sparse"]


@dataclass
class RopeScaling:
    """How RoPE frequencies are stretched beyond the trained context (see ``model/rope.py``).

    ``type``: ``linear`` = position interpolation (PI), ``ntk`` = NTK-aware base change,
    ``dynamic`` = NTK with the base recomputed from the current length, ``yarn`` = NTK-by-parts
    with an attention temperature, ``llama3`` = Llama-3.1's smooth per-band interpolation,
    ``ntk_by_parts`` = the YaRN paper's ramp over turns per trained context, no temperature.
    """

    type: RopeType = "default"
    factor: float = 1.0
    original_max_seq_len: int | None = None
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn and ntk_by_parts (β and α of the ramp: turns over the original context)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None  # None: 0.1*ln(factor)+1 (or from mscale below)
    mscale: float | None = None  # DeepSeek's yarn variant
    mscale_all_dim: float | None = None
    truncate: bool = True  # yarn: round the correction range to whole dims (HF default)


@dataclass
class DualChunkConfig:
    """Dual chunk attention (An et al. 2024, see ``model/dual_chunk_attention.py``): a RoPE model attends beyond
    its trained length while every relative position it sees stays below ``chunk_size + local_window`` (the
    paper's c = s + w); choose that sum ≤ the length the model was trained at."""

    chunk_size: int  # s: keys take positions 0..s-1 within their chunk
    local_window: int  # w: the first w queries of a chunk see the previous chunk at their true distance

    @classmethod
    def for_trained_length(cls, trained: int) -> DualChunkConfig:
        """ChunkLlama's defaults: c = 3/4 of the trained length, w = 1/16 of it, s = c − w."""
        window = max(trained // 16, 1)
        return cls(chunk_size=trained * 3 // 4 - window, local_window=window)


@dataclass
class MoEConfig:
    """Mixture of experts in the feed-forward slot (see ``model/moe.py``)."""

    n_experts: int = 8
    top_k: int = 2
    expert_ffn_dim: int = 0  # 0: use ModelConfig.ffn_dim
    n_shared_experts: int = 0  # always-on experts (DeepSeek, Qwen-MoE)
    shared_ffn_dim: int = 0  # 0: n_shared_experts * expert_ffn_dim, as one MLP
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid gate on the shared expert output
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk_prob: bool = True  # renormalise the chosen k weights to sum to 1
    routed_scaling_factor: float = 1.0
    score_correction_bias: bool = False  # DeepSeek-V3: bias used for choosing, not for weighting
    n_groups: int = 1  # group-limited routing (DeepSeek): pick topk_groups groups first
    topk_groups: int = 1
    group_score: Literal["max", "top2_sum"] = "max"
    noisy_routing: bool = False  # noisy top-k (Shazeer 2017): learned gaussian noise on logits in training
    capacity_factor: float | None = None  # None: no capacity limit (dropless)
    aux_loss_coef: float = 0.01
    first_dense_layers: int = 0  # first k blocks use a dense MLP (DeepSeek first_k_dense_replace)
    layer_freq: int = 1  # every n-th block is MoE (Qwen decoder_sparse_step)
    dense_layers: tuple[int, ...] = ()  # explicit dense blocks (Qwen mlp_only_layers)

    def __post_init__(self) -> None:
        self.dense_layers = tuple(self.dense_layers)


@dataclass
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3, see ``model/mla.py``)."""

    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536  # None: queries are projected directly (V2-Lite)
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128


@dataclass
class SparseAttentionConfig:
    """A fixed sparsity pattern over softmax attention, as a boolean mask (see ``model/sparse_attention_masks.py``).

    ``local_global`` (Longformer): each token sees the ``window`` tokens before it (itself included; both sides
    when not causal) and the first ``global_tokens`` positions; those attend to all. ``block_sparse`` (BigBird):
    positions in blocks of ``block_size``; a query block sees ``window_blocks`` blocks around it (itself
    included), the first ``global_blocks`` blocks (which see all) and ``random_blocks`` others chosen with
    ``seed``. Applied by position to the full-attention layers (not the sliding-window ones).
    """

    pattern: SparsePattern = "local_global"
    window: int = 64  # local_global
    global_tokens: int = 1
    block_size: int = 16  # block_sparse
    window_blocks: int = 1
    global_blocks: int = 1
    random_blocks: int = 0
    seed: int = 0


@dataclass
class ModelConfig:
    """A decoder-only Transformer, described by what it is rather than what it is called."""

    vocab_size: int = 32000
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None  # None: = n_heads (MHA); 1 = MQA; in between = GQA
    head_dim: int | None = None  # None: dim // n_heads
    ffn_dim: int = 2048
    max_seq_len: int = 2048

    # embeddings and output
    embed_scale: bool = False  # Gemma multiplies embeddings by sqrt(dim)
    embed_norm: bool = False  # BLOOM normalises the embeddings before block 0
    tie_embeddings: bool = False
    logit_softcap: float | None = None

    # positions
    positions: PositionKind = "rope"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    rope_interleaved: bool = False  # rotate (x0,x1),(x2,x3).. pairs instead of the two halves
    # Gemma 3: sliding-window layers rotate with a RoPE of their own (base 1e4, unscaled) while the
    # global layers use rope_theta / rope_scaling. None: every layer shares one RoPE.
    sliding_rope_theta: float | None = None
    sliding_rope_scaling: RopeScaling = field(default_factory=RopeScaling)  # only with sliding_rope_theta
    # T5's relative position bias (positions="relative_bias", model/relative_position_bias.py): a learned bias per
    # head and distance bucket, one table shared by all layers. T5 also leaves q·k unscaled: attn_scale=1.0.
    relative_num_buckets: int = 32
    relative_max_distance: int = 128  # distances beyond it share the last bucket
    relative_bidirectional: bool = False  # True for an encoder: keys after the query get buckets of their own
    dual_chunk: DualChunkConfig | None = None  # dual chunk attention: RoPE positions remapped per chunk

    # norms
    norm: NormKind = "rmsnorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True  # LayerNorm only
    norm_unit_offset: bool = False  # Gemma's RMSNorm scales by (1 + weight)
    norm_placement: NormPlacement = "pre"

    # attention
    attn_qkv_bias: bool = False
    attn_out_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each head's q and k (Qwen3)
    attn_gate: bool = False  # sigmoid output gate per head channel (gated attention)
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] | None = None  # None: every layer uses the window when set
    attn_scale: float | None = None  # None: 1/sqrt(head_dim)
    mla: MLAConfig | None = None
    attention: AttentionKind = "softmax"  # "linear": kernelized linear attention (model/linear_attention.py)
    sparse_attention: SparseAttentionConfig | None = None  # a fixed mask pattern over softmax attention
    # S2-Attn (LongLoRA): training forwards attend within groups of this many tokens, half of the heads shifted by
    # half a group (model/shifted_sparse_attention.py); inference and cached forwards use full attention.
    s2_attn_group: int | None = None

    # feed-forward
    activation: Activation = "silu"
    gated_mlp: bool = True  # SwiGLU / GeGLU when True
    mlp_bias: bool = False
    moe: MoEConfig | None = None

    # bookkeeping
    dtype: str = "float32"
    init_std: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        # Accept plain dicts for the nested configs (as read from JSON).
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = _nested(RopeScaling, self.rope_scaling, "rope_scaling")
        if isinstance(self.sliding_rope_scaling, dict):
            self.sliding_rope_scaling = _nested(RopeScaling, self.sliding_rope_scaling, "sliding_rope_scaling")
        if isinstance(self.dual_chunk, dict):
            self.dual_chunk = _nested(DualChunkConfig, self.dual_chunk, "dual_chunk")
        if isinstance(self.moe, dict):
            self.moe = _nested(MoEConfig, self.moe, "moe")
        if isinstance(self.mla, dict):
            self.mla = _nested(MLAConfig, self.mla, "mla")
        if isinstance(self.sparse_attention, dict):
            self.sparse_attention = _nested(SparseAttentionConfig, self.sparse_attention, "sparse_attention")
        for name in ("n_heads", "dim"):  # head_dim is derived from them: check their type first
            _check_int(name, getattr(self, name))
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.sliding_layers is not None:
            self.sliding_layers = tuple(self.sliding_layers)
        self.validate()

    def validate(self) -> None:
        """Reject configs that cannot build a model, naming the field at fault."""
        positive = ["vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "max_seq_len"]
        for name in positive:
            _check_int(name, getattr(self, name))
        if self.sliding_window is not None:
            _check_int("sliding_window", self.sliding_window)
        self._check_sizes()
        self._check_token_ids()
        for name, kind in (("positions", PositionKind), ("norm", NormKind), ("norm_placement", NormPlacement),
                           ("activation", Activation), ("attention", AttentionKind)):
            value = getattr(self, name)
            if value not in get_args(kind):
                raise ValueError(f"ModelConfig.{name} must be one of {list(get_args(kind))}, got {value!r}")
        for name in ("rope_scaling", "sliding_rope_scaling"):
            if getattr(self, name).type not in get_args(RopeType):
                raise ValueError(f"ModelConfig.{name}.type must be one of {list(get_args(RopeType))}, "
                                 f"got {getattr(self, name).type!r}")
            s = getattr(self, name)
            if s.type == "ntk_by_parts" and not s.beta_fast > s.beta_slow:
                raise ValueError(f"ModelConfig.{name}: ntk_by_parts ramps from beta_slow to beta_fast, so it needs "
                                 f"beta_fast > beta_slow, got {s.beta_fast} and {s.beta_slow}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.moe is not None and not 1 <= self.moe.top_k <= self.moe.n_experts:
            raise ValueError(f"MoEConfig.top_k must be in [1, n_experts={self.moe.n_experts}], got {self.moe.top_k}")
        if self.moe is not None and self.moe.n_experts % self.moe.n_groups:
            raise ValueError(f"MoEConfig.n_experts ({self.moe.n_experts}) must be divisible by n_groups "
                             f"({self.moe.n_groups})")
        self._check_efficient_attention()
        if self.norm_placement == "deepnorm" and self.mla is not None:
            raise ValueError("ModelConfig.norm_placement='deepnorm' needs q/k/v/o projections for its init "
                             "(the DeepNet paper's); it is not defined for MLA (ModelConfig.mla)")
        if self.mla is not None and self.positions != "rope":
            raise ValueError(f"ModelConfig.mla carries positions in its decoupled RoPE dimensions "
                             f"(MLAConfig.qk_rope_head_dim): it needs positions='rope', got {self.positions!r}")
        rope_field = "MLAConfig.qk_rope_head_dim" if self.mla else "ModelConfig.head_dim"
        rope_dim = self.mla.qk_rope_head_dim if self.mla else self.head_dim
        if self.positions == "rope" and rope_dim % 2:
            raise ValueError(f"{rope_field} must be even for RoPE (it is the rotary dimension), got {rope_dim}")
        if self.positions == "relative_bias":
            self._check_relative_buckets()
        if self.dual_chunk is not None:
            self._check_dual_chunk()
        if self.s2_attn_group is not None:
            self._check_s2_attn()

    def _check_relative_buckets(self) -> None:
        """T5's bucketing needs exact buckets (half of them, per direction) below a larger max_distance."""
        _check_int("relative_num_buckets", self.relative_num_buckets)
        _check_int("relative_max_distance", self.relative_max_distance)
        per_direction = self.relative_num_buckets // (2 if self.relative_bidirectional else 1)
        if per_direction < 2:
            raise ValueError(f"ModelConfig.relative_num_buckets must be >= {4 if self.relative_bidirectional else 2}"
                             f"{' (bidirectional)' if self.relative_bidirectional else ''}, "
                             f"got {self.relative_num_buckets}")
        if self.relative_max_distance <= per_direction // 2:
            raise ValueError(f"ModelConfig.relative_max_distance ({self.relative_max_distance}) must exceed the "
                             f"{per_direction // 2} exact-distance buckets")
        if self.relative_num_buckets > MAX_SIZES["max_seq_len"]:
            raise ValueError(f"ModelConfig.relative_num_buckets = {self.relative_num_buckets} is beyond any real "
                             f"model (at most {MAX_SIZES['max_seq_len']}): the config is damaged")

    def _check_dual_chunk(self) -> None:
        d = self.dual_chunk
        for name, least in (("chunk_size", 1), ("local_window", 0)):
            value = getattr(d, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"ModelConfig.dual_chunk.{name} must be an integer >= {least}, got {value!r}")
        if d.local_window > d.chunk_size:
            raise ValueError(f"ModelConfig.dual_chunk.local_window ({d.local_window}) must be <= chunk_size "
                             f"({d.chunk_size}): it is a part of the chunk")
        clashes = {"positions": self.positions != "rope", "mla": self.mla is not None,
                   "sliding_window": self.sliding_window is not None}
        for name, clash in clashes.items():
            if clash:
                raise ValueError(f"ModelConfig.dual_chunk remaps RoPE positions of ordinary attention: it does not "
                                 f"combine with {name}={getattr(self, name)!r} (it needs positions='rope', no mla "
                                 "and no sliding_window)")

    def _check_s2_attn(self) -> None:
        """S2-Attn shifts half of the heads by half a group, inside the softmax attention of ``attention.py``."""
        g = self.s2_attn_group
        if not isinstance(g, int) or isinstance(g, bool) or g < 2 or g % 2:
            raise ValueError(f"ModelConfig.s2_attn_group must be an even integer >= 2 (half of the heads shift by "
                             f"half a group), got {g!r}")
        if g > self.max_seq_len:
            raise ValueError(f"ModelConfig.s2_attn_group ({g}) exceeds max_seq_len ({self.max_seq_len}): no sequence "
                             "the model takes is a whole number of groups")
        if self.n_heads % 2:
            raise ValueError(f"ModelConfig.s2_attn_group: S2-Attn shifts half of the heads, so n_heads must be even, "
                             f"got {self.n_heads}")
        clashes = {"mla": (self.mla, "MLA attends in model/mla.py, which has no S2-Attn"),
                   "attention": (self.attention == "linear", "linear attention has no softmax groups to cut"),
                   "dual_chunk": (self.dual_chunk, "dual chunk attention rotates queries per (query, key) region, "
                                                   "which the grouped scores do not follow")}
        for name, (clash, why) in clashes.items():
            if clash:
                raise ValueError(f"ModelConfig.s2_attn_group does not combine with {name}={getattr(self, name)!r}: "
                                 f"{why}")

    def _check_efficient_attention(self) -> None:
        """Linear attention has no softmax, so nothing that shapes softmax scores applies to it; a sparse pattern
        must keep every query's own position (else a row of the mask could be empty)."""
        if self.attention == "linear":
            clashes = {"positions": self.positions in ("rope", "alibi", "relative_bias"),
                       "sliding_window": self.sliding_window, "dual_chunk": self.dual_chunk,
                       "mla": self.mla, "attn_scale": self.attn_scale, "sparse_attention": self.sparse_attention}
            for name, clash in clashes.items():
                if clash:
                    raise ValueError(f"ModelConfig.attention='linear' does not combine with {name}="
                                     f"{getattr(self, name)!r} (it has no softmax scores to rotate, bias, scale or "
                                     "mask); use positions='learned', 'sinusoidal' or 'none', the others unset")
        sparse = self.sparse_attention
        if sparse is None:
            return
        if sparse.pattern not in get_args(SparsePattern):
            raise ValueError(f"SparseAttentionConfig.pattern must be one of {list(get_args(SparsePattern))}, "
                             f"got {sparse.pattern!r}")
        for name in ("window", "block_size", "window_blocks"):
            _check_int(f"sparse_attention.{name}", getattr(sparse, name))
        for name in ("global_tokens", "global_blocks", "random_blocks", "seed"):
            value = getattr(sparse, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ModelConfig.sparse_attention.{name} must be an integer >= 0, got {value!r}")
        n_blocks = -(-self.max_seq_len // sparse.block_size)
        if sparse.pattern == "block_sparse" and n_blocks > MAX_SPARSE_BLOCKS:
            raise ValueError(f"ModelConfig.sparse_attention: max_seq_len={self.max_seq_len} in blocks of "
                             f"{sparse.block_size} makes {n_blocks} blocks (at most {MAX_SPARSE_BLOCKS}: the block "
                             "layout is n_blocks x n_blocks); use a larger block_size")

    def _check_sizes(self) -> None:
        """Refuse sizes no real model has, before anything is built from them."""
        fields = {name: getattr(self, name) for name in MAX_SIZES}
        for prefix, nested in (("MoEConfig", self.moe), ("MLAConfig", self.mla)):
            fields.update({f"{prefix}.{k}": getattr(nested, k) for k in MAX_NESTED_SIZES if hasattr(nested, k)})
        for name, value in fields.items():
            limit = MAX_SIZES.get(name) or MAX_NESTED_SIZES[name.split(".")[-1]]
            if isinstance(value, int | float) and value > limit:
                where = name if "." in name else f"ModelConfig.{name}"
                raise ValueError(f"{where} = {value} is beyond any real model (at most {limit}): "
                                 "the config is damaged")
        if self.moe is not None and self.n_layers * self.moe.n_experts > MAX_EXPERT_MODULES:
            raise ValueError(f"ModelConfig.n_layers x MoEConfig.n_experts = {self.n_layers} x {self.moe.n_experts} "
                             f"experts is beyond any real model (at most {MAX_EXPERT_MODULES})")

    def _check_token_ids(self) -> None:
        """bos/eos/pad ids must be rows of the embedding (an id past it fails inside a forward)."""
        for name in ("bos_token_id", "pad_token_id"):
            if getattr(self, name) is not None:
                _check_id(name, getattr(self, name), self.vocab_size)
        eos = self.eos_token_id
        if isinstance(eos, list | tuple):
            if len(eos) > MAX_EOS_IDS:
                raise ValueError(f"ModelConfig.eos_token_id lists {len(eos)} ids (at most {MAX_EOS_IDS})")
            for i in eos:
                _check_id("eos_token_id", i, self.vocab_size)
        elif eos is not None:
            _check_id("eos_token_id", eos, self.vocab_size)

    # --- derived facts -------------------------------------------------------------------
    def is_sliding(self, layer: int) -> bool:
        if self.sliding_window is None:
            return False
        return self.sliding_layers is None or layer in self.sliding_layers

    def is_moe(self, layer: int) -> bool:
        m = self.moe
        if m is None or layer < m.first_dense_layers or layer in m.dense_layers:
            return False
        return (layer + 1) % m.layer_freq == 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {unknown}")
        return cls(**d)

    def replace(self, **overrides: Any) -> ModelConfig:
        return from_overrides(self, overrides)


def _check_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"ModelConfig.{name} must be an integer >= 1, got {value!r}")


def _check_id(name: str, value: Any, vocab_size: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab_size:
        raise ValueError(f"ModelConfig.{name} must be a token id in [0, vocab_size={vocab_size}), got {value!r}")


def paper_preset(cls: type, presets: dict[str, dict[str, Any]], name: str, overrides: dict[str, Any]) -> Any:
    """``cls`` built from the preset ``name`` (a paper's configuration) with ``overrides``, unknown names refused."""
    if name not in presets:
        raise ValueError(f"unknown {cls.__name__} preset {name!r}; available: {sorted(presets)}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
    return dataclasses.replace(cls(**presets[name]), **overrides)


def _nested(cls: type, d: dict[str, Any], name: str) -> Any:
    """Build a nested config from a dict, naming unknown or missing keys instead of a bare TypeError."""
    fields = dataclasses.fields(cls)
    unknown = sorted(set(d) - {f.name for f in fields})
    if unknown:
        raise ValueError(f"unknown ModelConfig.{name} fields: {unknown}")
    missing = [f.name for f in fields if f.name not in d
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"ModelConfig.{name} needs the fields {missing}")
    return cls(**d)


def from_overrides(base: ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
    """A copy of ``base`` with fields replaced; nested configs may be given as dicts of changes."""
    d = base.to_dict()
    for key, value in overrides.items():
        if key not in d:
            raise ValueError(f"unknown ModelConfig field {key!r}")
        if isinstance(value, dict) and isinstance(d[key], dict):
            d[key] = {**d[key], **value}
        elif dataclasses.is_dataclass(value):
            d[key] = dataclasses.asdict(value)
        else:
            d[key] = value
    return ModelConfig.from_dict(d)


# --- presets ------------------------------------------------------------------------------
# Real shapes for the families lucidlm loads; `tiny` variants for tests come from overrides,
# e.g. from_preset("llama3-8b", dim=64, n_layers=2, ...).
PRESETS: dict[str, dict[str, Any]] = {
    "llama-125m": dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048),
    "llama3-8b": dict(
        vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
        max_seq_len=131072, rope_theta=500000.0, norm_eps=1e-5,
        rope_scaling=dict(type="llama3", factor=8.0, original_max_seq_len=8192),
    ),
    "mistral-7b": dict(
        vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
        max_seq_len=32768, rope_theta=1e6, sliding_window=4096,
    ),
    "qwen2-0.5b": dict(
        vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, ffn_dim=4864,
        max_seq_len=32768, rope_theta=1e6, norm_eps=1e-6, attn_qkv_bias=True, tie_embeddings=True,
    ),
    "qwen3-0.6b": dict(
        vocab_size=151936, dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128, ffn_dim=3072,
        max_seq_len=40960, rope_theta=1e6, norm_eps=1e-6, qk_norm=True, tie_embeddings=True,
    ),
    "gemma-2b": dict(
        vocab_size=256000, dim=2048, n_layers=18, n_heads=8, n_kv_heads=1, head_dim=256, ffn_dim=16384,
        max_seq_len=8192, norm_eps=1e-6, embed_scale=True, norm_unit_offset=True, activation="gelu_tanh",
        tie_embeddings=True,
    ),
    "gemma3-270m": dict(
        vocab_size=262144, dim=640, n_layers=18, n_heads=4, n_kv_heads=1, head_dim=256, ffn_dim=2048,
        max_seq_len=32768, norm_eps=1e-6, embed_scale=True, norm_unit_offset=True, norm_placement="sandwich",
        qk_norm=True, activation="gelu_tanh", tie_embeddings=True, attn_scale=256**-0.5,  # query_pre_attn_scalar
        rope_theta=1e6, sliding_rope_theta=1e4, sliding_window=512,
        sliding_layers=tuple(i for i in range(18) if (i + 1) % 6),  # every 6th layer attends globally
    ),
    "gpt2": dict(
        vocab_size=50257, dim=768, n_layers=12, n_heads=12, ffn_dim=3072, max_seq_len=1024,
        positions="learned", norm="layernorm", activation="gelu_tanh", gated_mlp=False, mlp_bias=True,
        attn_qkv_bias=True, attn_out_bias=True, tie_embeddings=True,
    ),
    "bloom-560m": dict(
        vocab_size=250880, dim=1024, n_layers=24, n_heads=16, ffn_dim=4096, max_seq_len=2048,
        positions="alibi", norm="layernorm", activation="gelu_tanh", gated_mlp=False, mlp_bias=True,
        attn_qkv_bias=True, attn_out_bias=True, tie_embeddings=True, embed_norm=True,
    ),
    "mixtral-8x7b": dict(
        vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
        max_seq_len=32768, rope_theta=1e6, moe=dict(n_experts=8, top_k=2, aux_loss_coef=0.02),
    ),
    "qwen3-30b-a3b": dict(
        vocab_size=151936, dim=2048, n_layers=48, n_heads=32, n_kv_heads=4, head_dim=128, ffn_dim=6144,
        max_seq_len=40960, rope_theta=1e6, norm_eps=1e-6, qk_norm=True,
        moe=dict(n_experts=128, top_k=8, expert_ffn_dim=768, aux_loss_coef=0.001),
    ),
    "deepseek-v2-lite": dict(
        vocab_size=102400, dim=2048, n_layers=27, n_heads=16, ffn_dim=10944, max_seq_len=163840,
        norm_eps=1e-6, rope_interleaved=True,
        mla=dict(kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
        moe=dict(n_experts=64, top_k=6, expert_ffn_dim=1408, n_shared_experts=2, first_dense_layers=1,
                 norm_topk_prob=False, aux_loss_coef=0.001),
        rope_scaling=dict(type="yarn", factor=40.0, original_max_seq_len=4096, beta_fast=32, beta_slow=1,
                          mscale=0.707, mscale_all_dim=0.707),
    ),
    "deepseek-v3": dict(
        vocab_size=129280, dim=7168, n_layers=61, n_heads=128, ffn_dim=18432, max_seq_len=163840,
        norm_eps=1e-6, rope_interleaved=True,
        mla=dict(kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
        moe=dict(n_experts=256, top_k=8, expert_ffn_dim=2048, n_shared_experts=1, first_dense_layers=3,
                 scoring="sigmoid", score_correction_bias=True, n_groups=8, topk_groups=4,
                 group_score="top2_sum", routed_scaling_factor=2.5, aux_loss_coef=0.0),
        rope_scaling=dict(type="yarn", factor=40.0, original_max_seq_len=4096, beta_fast=32, beta_slow=1,
                          mscale=1.0, mscale_all_dim=1.0),
    ),
}

# A tiny shape that any preset can be shrunk to for tests and demos.
TINY = dict(dim=64, n_layers=2, n_heads=4, ffn_dim=128, vocab_size=256, max_seq_len=256)


def from_preset(name: str, **overrides: Any) -> ModelConfig:
    """Build a config from a named preset; ``tiny=True`` shrinks it to a test-sized model."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    base = dict(PRESETS[name])
    if overrides.pop("tiny", False):
        kv = base.get("n_kv_heads")
        base.update(TINY)
        base["n_kv_heads"] = None if kv is None else min(kv, 2)  # MHA stays MHA, MQA stays MQA
        base["head_dim"] = None
        if "mla" in base:
            base["mla"] = dict(kv_lora_rank=16, q_lora_rank=None if base["mla"]["q_lora_rank"] is None else 24,
                               qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
        if "moe" in base:
            moe = dict(base["moe"])
            moe.update(n_experts=8, top_k=min(moe["top_k"], 2), expert_ffn_dim=32,
                       n_groups=min(moe.get("n_groups", 1), 2), topk_groups=1,
                       first_dense_layers=min(moe.get("first_dense_layers", 0), 1))
            base["moe"] = moe
        if "rope_scaling" in base and base["rope_scaling"].get("original_max_seq_len"):
            base["rope_scaling"] = {**base["rope_scaling"], "original_max_seq_len": 64}
        if base.get("sliding_window"):
            base["sliding_window"] = 16
    cfg = ModelConfig.from_dict({k: v for k, v in base.items()})
    return cfg.replace(**overrides) if overrides else cfg
