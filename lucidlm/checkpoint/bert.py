"""BERT (``model_type: bert``): an encoder-only masked LM, mapped onto ``model/encoder.py``'s ``MaskedLM``.

Every tensor is a plain rename: BERT's linear layers are ``nn.Linear`` (out, in) like lucidlm's. The MLM
decoder is tied to the word embeddings, so a checkpoint usually stores no ``cls.predictions.decoder.weight``
(older ones do, as a copy; ``decoder.bias`` is then an alias of ``cls.predictions.bias``). A pre-training
checkpoint (``BertForPreTraining``, e.g. bert-base-uncased) also holds the pooler and the next-sentence
head, which masked-LM logits do not use: they are skipped.

This family is not in ``loader.FAMILIES`` (the causal LMs ``lucidlm.load`` builds a ``Transformer`` for):
``encoder_loader.py`` loads it, and ``lucidlm.load`` refuses it naming ``lucidlm.load_encoder``.
"""

from __future__ import annotations

from ..model.encoder import EncoderConfig
from .errors import CheckpointError
from .family import Family, Rule, activation, check_unsupported, require

ENCODER_MODEL_TYPES = ("bert",)
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}


def bert_config(hf: dict) -> EncoderConfig:
    require(hf, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    check_unsupported(hf, {"is_decoder": False, "add_cross_attention": False, "position_embedding_type": "absolute"})
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    try:
        return EncoderConfig(
            vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_heads=hf["num_attention_heads"],
            n_layers=hf["num_hidden_layers"], ffn_dim=hf["intermediate_size"],
            max_len=hf.get("max_position_embeddings", 512), type_vocab_size=hf.get("type_vocab_size", 2),
            activation=activation(hf.get("hidden_act", "gelu")), dropout=hf.get("hidden_dropout_prob", 0.1),
            norm_eps=hf.get("layer_norm_eps", 1e-12), tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            init_std=hf.get("initializer_range", 0.02), pad_token_id=hf.get("pad_token_id"),
            dtype=str(dtype).replace("torch.", ""),
        )
    except ValueError as e:
        raise CheckpointError(f"config.json: not a valid bert config ({e})") from e


def bert_hf_config(cfg: EncoderConfig) -> dict:
    """config.json that transformers' ``BertForMaskedLM`` reads back as this model."""
    return {
        "model_type": "bert", "architectures": ["BertForMaskedLM"], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.ffn_dim, "max_position_embeddings": cfg.max_len,
        "type_vocab_size": cfg.type_vocab_size, "hidden_act": HF_ACTIVATIONS[cfg.activation],
        "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": 0.0, "layer_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
        "pad_token_id": cfg.pad_token_id, "is_decoder": False, "add_cross_attention": False, "dtype": cfg.dtype,
    }


def _bert_special(cfg: EncoderConfig, our_names: list[str]) -> list[Rule]:
    """Untied: transformers 5 keeps ``decoder.bias`` (what its forward adds) apart from ``cls.predictions.bias``
    (then unused); the bias is read from the first and written to both."""
    if cfg.tie_embeddings:
        return []
    return [Rule(("head.bias",), ("cls.predictions.decoder.bias", "cls.predictions.bias"),
                 lambda ts: ts[:1], lambda ts: [ts[0], ts[0].clone()])]


LAYER = r"encoder\.layers\.(\d+)\."
FAMILIES = [Family(
    ENCODER_MODEL_TYPES, bert_config, bert_hf_config,  # its configs are EncoderConfigs, not ModelConfigs
    renames=[
        (r"encoder\.embed\.weight", r"bert.embeddings.word_embeddings.weight"),
        (r"encoder\.positions\.weight", r"bert.embeddings.position_embeddings.weight"),
        (r"encoder\.token_types\.weight", r"bert.embeddings.token_type_embeddings.weight"),
        (r"encoder\.embed_norm\.(weight|bias)", r"bert.embeddings.LayerNorm.\1"),
        (LAYER + r"self_attn\.q_proj\.(.*)", r"bert.encoder.layer.\1.attention.self.query.\2"),
        (LAYER + r"self_attn\.k_proj\.(.*)", r"bert.encoder.layer.\1.attention.self.key.\2"),
        (LAYER + r"self_attn\.v_proj\.(.*)", r"bert.encoder.layer.\1.attention.self.value.\2"),
        (LAYER + r"self_attn\.o_proj\.(.*)", r"bert.encoder.layer.\1.attention.output.dense.\2"),
        (LAYER + r"attn_sub\.norm\.(.*)", r"bert.encoder.layer.\1.attention.output.LayerNorm.\2"),
        (LAYER + r"ffn\.up_proj\.(.*)", r"bert.encoder.layer.\1.intermediate.dense.\2"),
        (LAYER + r"ffn\.down_proj\.(.*)", r"bert.encoder.layer.\1.output.dense.\2"),
        (LAYER + r"ffn_sub\.norm\.(.*)", r"bert.encoder.layer.\1.output.LayerNorm.\2"),
        (r"head\.dense\.(.*)", r"cls.predictions.transform.dense.\1"),
        (r"head\.norm\.(.*)", r"cls.predictions.transform.LayerNorm.\1"),
        (r"head\.bias", r"cls.predictions.bias"),
        (r"head\.decoder\.weight", r"cls.predictions.decoder.weight"),  # untied checkpoints only
    ],
    special=_bert_special,
    # the pooler and next-sentence head of pre-training checkpoints; the position-id buffer of old ones; the
    # decoder's bias (an alias of cls.predictions.bias); a tied decoder's copy of the word embeddings
    ignored=(r"bert\.pooler\..*", r"cls\.seq_relationship\..*", r"bert\.embeddings\.position_ids",
             r"cls\.predictions\.decoder\.bias"),
)]
