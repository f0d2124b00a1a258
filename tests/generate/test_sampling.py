"""Logits processors and sampler against transformers' own processors, per row and chained in HF's order."""

from dataclasses import replace

import pytest
import torch
from hf_models import build_hf_model
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lucidlm.generate.sampling import (
    BatchSampling,
    SamplingParams,
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    row_generator,
    seen_tokens,
)
from lucidlm.generate.token_history import TokenHistory

BATCH, VOCAB, SEQ = 4, 50, 12
SEEDS = [0, 1, 2, 3]
NEG_INF = float("-inf")


def random_logits(seed: int, batch: int = BATCH, vocab: int = VOCAB) -> torch.Tensor:
    """Logits on a 0.5 grid (many exact ties, zeros included) with about 10% -inf entries."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.round(torch.randn(batch, vocab, generator=g) * 6) / 2
    logits[torch.rand(batch, vocab, generator=g) < 0.1] = NEG_INF
    logits[:, 0] = 1.0  # every row keeps a finite entry
    return logits


def random_ids(seed: int, batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed + 100))


def assert_exact(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.equal(torch.isneginf(ours), torch.isneginf(ref)), "different entries were masked"
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def full(value, dtype=torch.float32) -> torch.Tensor:
    return torch.full((BATCH,), value, dtype=dtype)


@pytest.fixture(scope="module")
def hf_model():
    return build_hf_model("llama")


def hf_config(p: SamplingParams) -> GenerationConfig:
    """Our parameters in transformers' terms; 'off' values must make HF skip (or no-op) the processor too."""
    if p.greedy:
        return GenerationConfig(do_sample=False, repetition_penalty=float(p.repetition_penalty))
    return GenerationConfig(do_sample=True, temperature=float(p.temperature), top_k=p.top_k, top_p=float(p.top_p),
                            min_p=float(p.min_p), repetition_penalty=float(p.repetition_penalty))


def hf_process(model, p: SamplingParams, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    processors = model._get_logits_processor(hf_config(p), input_ids_seq_length=ids.shape[1], device="cpu")
    return processors(ids, logits.clone())


def test_logits_have_ties_and_inf():  # guards the inputs the parity tests rely on
    logits = random_logits(0)
    finite = logits[torch.isfinite(logits)]
    assert torch.isneginf(logits).any()
    assert finite.unique().numel() < finite.numel() // 2


# --- each processor against its transformers counterpart -------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_hf(seed, penalty):
    logits, ids = random_logits(seed), random_ids(seed)
    ids[:, -1] = VOCAB + 3  # out-of-vocab ids mark nothing, as HF clamps them onto a dropped column
    ref = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    ours = apply_repetition_penalty(logits, seen_tokens(ids, VOCAB), full(penalty))
    assert_exact(ours, ref)
    assert not torch.equal(ours, logits)


def test_repetition_penalty_skips_left_padding_like_hf():
    logits, ids = random_logits(5), random_ids(5)
    pad = torch.tensor([0, 3, 7, 11])
    mask = (torch.arange(SEQ)[None, :] >= pad[:, None]).long()
    ref = RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=pad)(ids, logits.clone())
    ours = apply_repetition_penalty(logits, seen_tokens(ids, VOCAB, mask), full(1.5))
    assert_exact(ours, ref)
    assert not torch.equal(ours, apply_repetition_penalty(logits, seen_tokens(ids, VOCAB), full(1.5)))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.5, 2.0])
def test_temperature_matches_hf(seed, temperature):
    logits = random_logits(seed)
    ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
    assert_exact(apply_temperature(logits, full(temperature)), ref)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 3, 10, 50, 80])
@pytest.mark.parametrize("keep", [1, 5])
def test_top_k_matches_hf(seed, k, keep):
    logits = random_logits(seed)
    ref = TopKLogitsWarper(k, min_tokens_to_keep=keep)(None, logits.clone())
    assert_exact(apply_top_k(logits, full(k, torch.int64), min_tokens_to_keep=keep), ref)
    assert_exact(apply_top_k(logits, full(k, torch.int64), min_tokens_to_keep=keep, k_max=k), ref)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.95])
@pytest.mark.parametrize("keep", [1, 5])
def test_top_p_matches_hf(seed, p, keep):
    logits = random_logits(seed)
    ref = TopPLogitsWarper(p, min_tokens_to_keep=keep)(None, logits.clone())
    assert_exact(apply_top_p(logits, full(p, torch.float64), min_tokens_to_keep=keep), ref)


@pytest.mark.parametrize("p", [0.25, 0.5, 0.75])
def test_top_p_breaks_exact_ties_like_hf(p):
    # four equal tokens: the cumulative sum lands exactly on 1 - p, and HF's sort decides which tied ones go
    logits = torch.full((BATCH, VOCAB), NEG_INF)
    logits[:, 10:14] = 2.0
    ref = TopPLogitsWarper(p)(None, logits.clone())
    ours = apply_top_p(logits, full(p, torch.float64))
    assert_exact(ours, ref)
    assert (torch.isfinite(ours).sum(-1) == round(4 * p)).all()


def test_top_p_threshold_is_rounded_like_hf():
    # softmax gives 0.10000001639 for the first token: above float32(1 - 0.9) = 0.1000000015 (HF keeps it) but
    # below 1 - float32(0.9) = 0.1000000238 (a float32 subtraction would drop it)
    logits = torch.tensor([[-2.1972243785858154, 0.0]])
    ref = TopPLogitsWarper(0.9)(None, logits.clone())
    assert torch.isfinite(ref).all()
    assert_exact(BatchSampling.from_params([SamplingParams(top_p=0.9)], "cpu").process(logits, None), ref)
    assert_exact(apply_top_p(logits, torch.tensor([0.9], dtype=torch.float64)), ref)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("min_p", [0.05, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("keep", [1, 5])
def test_min_p_matches_hf(seed, min_p, keep):
    logits = random_logits(seed)
    ref = MinPLogitsWarper(min_p, min_tokens_to_keep=keep)(None, logits.clone())
    assert_exact(apply_min_p(logits, full(min_p), min_tokens_to_keep=keep), ref)


# --- per-row parameters: each row equals HF run on that row alone ------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_per_row_processors_match_hf_row_by_row(seed):
    logits, ids = random_logits(seed), random_ids(seed)
    seen = seen_tokens(ids, VOCAB)
    cases = [
        (apply_repetition_penalty(logits, seen, torch.tensor([1.0, 0.8, 1.3, 3.0])),
         [None, *(RepetitionPenaltyLogitsProcessor(x) for x in (0.8, 1.3, 3.0))]),
        (apply_temperature(logits, torch.tensor([1.0, 0.5, 1.7, 3.0])),
         [None, *(TemperatureLogitsWarper(x) for x in (0.5, 1.7, 3.0))]),
        (apply_top_k(logits, torch.tensor([0, 1, 4, 20])), [None, *(TopKLogitsWarper(x) for x in (1, 4, 20))]),
        (apply_top_p(logits, torch.tensor([1.0, 0.3, 0.8, 0.99], dtype=torch.float64)),
         [None, *(TopPLogitsWarper(x) for x in (0.3, 0.8, 0.99))]),
        (apply_min_p(logits, torch.tensor([0.0, 0.02, 0.3, 0.9])),
         [None, *(MinPLogitsWarper(x) for x in (0.02, 0.3, 0.9))]),
    ]
    for ours, processors in cases:
        for row, processor in enumerate(processors):
            alone = logits[row : row + 1]
            ref = alone if processor is None else processor(ids[row : row + 1], alone.clone())
            assert_exact(ours[row : row + 1], ref)


# --- the whole chain, in the order transformers builds it --------------------------------------------------------

CHAINS = [
    SamplingParams(temperature=0.7, top_k=10, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
    SamplingParams(temperature=1.8, top_k=25, top_p=0.6, min_p=0.1, repetition_penalty=0.7),
    SamplingParams(temperature=2.5, top_p=0.5),
    SamplingParams(temperature=0.5, min_p=0.3, repetition_penalty=2.0),
    SamplingParams(top_k=5, top_p=0.8),
    SamplingParams(),
]


def test_hf_builds_the_order_the_docstring_states(hf_model):
    processors = hf_model._get_logits_processor(hf_config(CHAINS[0]), input_ids_seq_length=SEQ, device="cpu")
    assert [type(p).__name__ for p in processors] == [
        "RepetitionPenaltyLogitsProcessor", "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper",
        "MinPLogitsWarper"]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("params", CHAINS, ids=range(len(CHAINS)))
def test_chain_matches_hf_get_logits_processor(hf_model, seed, params):
    logits, ids = random_logits(seed), random_ids(seed)
    ours = BatchSampling.from_params([params] * BATCH, "cpu").process(logits, seen_tokens(ids, VOCAB))
    assert_exact(ours, hf_process(hf_model, params, ids, logits))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chain_matches_hf_in_half_precision(hf_model, dtype):
    # parameters stay float32 and results are rounded once, as HF's ops with Python-float operands do on CPU
    for seed in SEEDS[:2]:
        logits = (torch.randn(BATCH, VOCAB, generator=torch.Generator().manual_seed(seed)) * 4).to(dtype)
        ids = random_ids(seed)
        for params in CHAINS[:4]:
            ours = BatchSampling.from_params([params] * BATCH, "cpu").process(logits, seen_tokens(ids, VOCAB))
            assert ours.dtype == dtype
            assert_exact(ours, hf_process(hf_model, params, ids, logits))


def test_the_notes_order_gives_a_different_result():
    # top-k -> top-p -> temperature (study notes) keeps other tokens than transformers' temperature-first order,
    # so the chain test above can tell the two apart
    logits, p = random_logits(0), CHAINS[2]
    hf_order = BatchSampling.from_params([p] * BATCH, "cpu").process(logits, None)
    notes_order = apply_temperature(apply_top_p(logits, full(p.top_p, torch.float64)), full(p.temperature))
    assert not torch.equal(torch.isneginf(hf_order), torch.isneginf(notes_order))


MIXED = [
    SamplingParams(temperature=0.7, top_k=10, top_p=0.9, min_p=0.05, repetition_penalty=1.3, seed=1),
    SamplingParams(temperature=0, top_k=3, top_p=0.5, repetition_penalty=1.5),  # greedy: warpers ignored
    SamplingParams(),
    SamplingParams(temperature=2.0, top_p=0.4, min_p=0.2),
]


@pytest.mark.parametrize("seed", SEEDS)
def test_mixed_batch_rows_match_hf_alone(hf_model, seed):
    logits, ids = random_logits(seed), random_ids(seed)
    ours = BatchSampling.from_params(MIXED, "cpu").process(logits, seen_tokens(ids, VOCAB))
    for row, params in enumerate(MIXED):
        ref = hf_process(hf_model, params, ids[row : row + 1], logits[row : row + 1])
        assert_exact(ours[row : row + 1], ref)


def test_process_skips_processors_that_are_off(monkeypatch):
    logits = random_logits(0)
    assert BatchSampling.from_params([SamplingParams()] * BATCH, "cpu").process(logits, None) is logits

    def no_sort(*args, **kwargs):
        raise AssertionError("sorted although no row uses top-p")

    monkeypatch.setattr(torch, "sort", no_sort)
    BatchSampling.from_params([SamplingParams(top_k=3, temperature=0.5)] * BATCH, "cpu").process(logits, None)
    with pytest.raises(AssertionError, match="sorted"):
        BatchSampling.from_params([SamplingParams(top_p=0.5)] * BATCH, "cpu").process(logits, None)


def test_process_rejects_bad_inputs():
    sampling = BatchSampling.from_params([SamplingParams(repetition_penalty=1.2)] * BATCH, "cpu")
    with pytest.raises(ValueError, match="seen"):
        sampling.process(random_logits(0), None)
    with pytest.raises(ValueError, match="seen"):
        sampling.process(random_logits(0), torch.zeros(BATCH, VOCAB + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch=4"):
        sampling.process(random_logits(0, batch=3), None)
    with pytest.raises(ValueError, match="generator"):
        sampling.sample(random_logits(0), [None] * 3)
    with pytest.raises(ValueError, match="empty"):
        BatchSampling.from_params([], "cpu")
    with pytest.raises(TypeError, match="params\\[1\\]"):
        BatchSampling.from_params([SamplingParams(), {"temperature": 1.0}], "cpu")


# --- sampling -----------------------------------------------------------------------------------------------------


def test_greedy_rows_take_argmax_after_repetition_penalty_only(hf_model):
    logits, ids = random_logits(3), random_ids(3)
    ids[:, 0] = 0  # token 0 (logit 1.0) is seen ...
    logits[:, 0] = 100.0  # ... and the raw argmax; a penalty of 1000 must move the argmax elsewhere
    params = [SamplingParams(temperature=0, top_k=1, top_p=0.1, min_p=0.9, repetition_penalty=1000.0)] * BATCH
    sampling = BatchSampling.from_params(params, "cpu")
    processed = sampling.process(logits, seen_tokens(ids, VOCAB))
    ref = hf_process(hf_model, params[0], ids, logits)
    assert_exact(processed, ref)  # no warper ran: only the penalty changed the logits
    tokens = sampling.sample(processed, [row_generator(p, 0, "cpu") for p in params])
    assert torch.equal(tokens, ref.argmax(-1))
    assert (tokens != 0).all()


def test_sampling_matches_hf_multinomial_step(hf_model):
    # HF's step: torch.multinomial(softmax(processed), 1) from the global RNG; unseeded rows do the same
    logits, ids, params = random_logits(1), random_ids(1), CHAINS[0]
    processed = hf_process(hf_model, params, ids, logits)
    torch.manual_seed(123)
    ref = torch.multinomial(processed.softmax(-1), 1).squeeze(1)
    sampling = BatchSampling.from_params([params] * BATCH, "cpu")
    torch.manual_seed(123)
    assert torch.equal(sampling.sample(sampling.process(logits, seen_tokens(ids, VOCAB)), [None] * BATCH), ref)
    # a seeded row draws from its own generator as HF would from a global RNG seeded the same
    one = BatchSampling.from_params([replace(params, seed=9)], "cpu")
    torch.manual_seed(9)
    ref_one = torch.multinomial(processed[:1].softmax(-1), 1).squeeze(1)
    torch.manual_seed(0)  # the global RNG must not matter for a seeded row
    assert torch.equal(one.sample(processed[:1], [row_generator(p, 0, "cpu") for p in one.params]), ref_one)


def draw(params: list[SamplingParams], logits: torch.Tensor, steps: int) -> torch.Tensor:
    sampling = BatchSampling.from_params(params, "cpu")
    generators = [row_generator(p, 0, "cpu") for p in params]
    processed = sampling.process(logits, None)
    return torch.stack([sampling.sample(processed, generators) for _ in range(steps)], dim=1)


def test_same_seed_same_samples_different_seed_different_samples():
    logits = torch.randn(1, VOCAB) * 0.3  # nearly flat: 30 draws from two seeds agreeing would be a fluke
    a = draw([SamplingParams(seed=7, temperature=1.2)], logits, 30)
    b = draw([SamplingParams(seed=7, temperature=1.2)], logits, 30)
    c = draw([SamplingParams(seed=8, temperature=1.2)], logits, 30)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_seeded_row_does_not_depend_on_its_batch():
    logits = torch.randn(1, VOCAB) * 0.3
    row = SamplingParams(seed=11, top_k=20)
    alone = draw([row], logits, 20)
    batch = [SamplingParams(), row, SamplingParams(temperature=0), SamplingParams(seed=12)]
    together = draw(batch, logits.expand(BATCH, -1), 20)
    assert torch.equal(together[1:2], alone)
    assert (together[2] == logits.argmax()).all()


def test_top_k_2_never_samples_outside_the_top_2():
    logits = torch.randn(1, VOCAB)
    top2 = set(logits.topk(2).indices[0].tolist())
    tokens = draw([SamplingParams(top_k=2, temperature=3.0)] * 500, logits.expand(500, -1), 1)
    assert set(tokens.flatten().tolist()) == top2
    seeded = draw([SamplingParams(top_k=2, temperature=3.0, seed=4)], logits, 500)
    assert set(seeded.flatten().tolist()) == top2


def test_sample_frequencies_follow_the_processed_distribution():
    logits = torch.randn(1, VOCAB) * 2
    params = SamplingParams(temperature=0.8, top_p=0.9)
    probs = BatchSampling.from_params([params], "cpu").process(logits, None).softmax(-1)[0]
    tokens = draw([params] * 4000, logits.expand(4000, -1), 1).flatten()
    freq = torch.bincount(tokens, minlength=VOCAB) / tokens.numel()
    assert (freq[probs == 0] == 0).all()
    torch.testing.assert_close(freq, probs, rtol=0, atol=0.03)


# --- seen tokens ----------------------------------------------------------------------------------------------------


def test_seen_tokens_marks_exactly_the_ids_present():
    ids = torch.tensor([[3, 3, 7, 0, 60], [1, -100, 2, 49, 2]])
    mask = torch.tensor([[1, 1, 1, 0, 1], [1, 1, 1, 1, 1]])
    seen = seen_tokens(ids, VOCAB, mask)
    assert seen.shape == (2, VOCAB) and seen.dtype == torch.bool
    assert torch.nonzero(seen[0]).flatten().tolist() == [3, 7]  # 0 is padding, 60 out of vocab
    assert torch.nonzero(seen[1]).flatten().tolist() == [1, 2, 49]  # -100 ignored
    assert seen_tokens(ids, VOCAB)[0, 0]


def test_token_history_recorded_step_by_step_equals_seen_of_whole_sequence():
    """The engine's history (prompt at start, one token per step) is what seen_tokens finds in the whole row."""
    ids = random_ids(0)
    history = TokenHistory(BATCH, VOCAB, torch.device("cpu"))
    for slot in range(BATCH):
        history.start(slot, ids[slot, :4].tolist(), SamplingParams(repetition_penalty=1.2, presence_penalty=0.5))
    slots = torch.arange(BATCH)
    for step in range(4, SEQ):
        history.record(slots, ids[:, step])
    seen, counts = history.rows(slots)
    assert torch.equal(seen, seen_tokens(ids, VOCAB))
    generated = seen_tokens(ids[:, 4:], VOCAB)  # counts cover generated tokens only (OpenAI, vLLM)
    assert torch.equal(counts > 0, generated) and int(counts.sum()) == BATCH * (SEQ - 4)


def test_row_generator_seeds_choice_j_with_seed_plus_j():
    params = SamplingParams(seed=7, temperature=1.0)
    draws = [torch.rand(3, generator=row_generator(params, j, "cpu")) for j in range(2)]
    assert torch.equal(draws[1], torch.rand(3, generator=torch.Generator().manual_seed(8)))
    assert row_generator(SamplingParams(seed=7, temperature=0), 0, "cpu") is None  # greedy draws nothing


# --- parameter validation -------------------------------------------------------------------------------------------

BAD_VALUES = [
    ("temperature", -1.0), ("temperature", float("nan")), ("temperature", float("inf")),
    ("top_k", -1),
    ("top_p", 0.0), ("top_p", -0.1), ("top_p", 1.5), ("top_p", float("nan")),
    ("min_p", -0.1), ("min_p", 1.01), ("min_p", float("nan")),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.2), ("repetition_penalty", float("inf")),
    ("seed", -1), ("seed", 2**64),
]
BAD_TYPES = [
    ("temperature", True), ("temperature", "0.7"), ("temperature", None),
    ("top_k", 2.0), ("top_k", False), ("top_k", "5"),
    ("top_p", "0.9"), ("min_p", None), ("repetition_penalty", True), ("seed", 1.5), ("seed", True),
]


@pytest.mark.parametrize("field,value", BAD_VALUES)
def test_bad_values_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field} must .*got {value}"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("field,value", BAD_TYPES)
def test_bad_types_raise_type_error_naming_the_field(field, value):
    with pytest.raises(TypeError, match=f"^{field} must be"):
        SamplingParams(**{field: value})


def test_boundary_values_are_accepted():
    assert SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=1e-3).greedy
    SamplingParams(top_k=0, top_p=1.0, min_p=0.0, seed=0)
    SamplingParams(top_p=1e-9, min_p=1.0, temperature=5, repetition_penalty=1e-3, seed=2**64 - 1)
    with pytest.raises(ValueError, match="temperature must be >= 0, got -1.0"):
        SamplingParams(temperature=-1)


def test_openai_penalties_and_logit_bias_follow_the_documented_formula():
    """OpenAI: mu[j] -> mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty, after logit_bias is added;
    the repetition penalty (prompt + output) comes between them, as in vLLM."""
    torch.manual_seed(0)
    logits = torch.randn(3, 20)
    counts = torch.zeros(3, 20, dtype=torch.int32)
    counts[0, [1, 2, 2, 5]] = torch.tensor([1, 3, 3, 2], dtype=torch.int32)
    counts[2, 7] = 4
    params = [SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25, logit_bias={"3": 7.5}),
              SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.0, presence_penalty=-1.0, frequency_penalty=2.0, logit_bias={7: -100})]
    got = BatchSampling.from_params(params).process(logits, None, counts)
    expected = logits.clone()
    for row, p in enumerate(params):
        for token, bias in p.logit_bias:
            expected[row, token] += bias
        for j in range(20):
            c = int(counts[row, j])
            expected[row, j] -= c * p.frequency_penalty + (1 if c > 0 else 0) * p.presence_penalty
    torch.testing.assert_close(got, expected)
    assert params[0].logit_bias == ((3, 7.5),) and not params[0].plain_greedy and params[1].plain_greedy
    with pytest.raises(ValueError, match="presence_penalty must be in \\[-2, 2\\]"):
        SamplingParams(presence_penalty=2.5)
    with pytest.raises(ValueError, match="logit_bias values must be in \\[-100, 100\\]"):
        SamplingParams(logit_bias={1: 101})
    with pytest.raises(ValueError, match="outside the vocabulary of 20"):
        BatchSampling.from_params([SamplingParams(logit_bias={25: 1.0})]).process(logits[:1], None)
    with pytest.raises(ValueError, match="counts must have the logits' shape"):
        BatchSampling.from_params([SamplingParams(frequency_penalty=1.0)]).process(logits[:1], None)
