"""DPO pairs (and R-Tuning SFT rows, ``--kind sft``) built from the same labels as the RL reward:
``lucidlm rl-pairs``.

Each RL prompt is answered by ``samples`` sampled responses from the engine (``rl_eval.sampled_rollouts``, the path
``rl-eval`` answers by), each graded against the ground truth (``rl_rewards.graded_row``) and scored as ``lucidlm
rl`` scores it (``verifiable_score`` with the same ``--verifiable.*`` options). One preference pair per prompt:
chosen = its highest-reward answer, rejected = its lowest (the first of them on a tie); a prompt whose answers all
score the same says nothing about which to prefer and is skipped.

A row is what ``lucidlm dpo --data`` reads (train/sft_data.PreferenceDataset): {"prompt": messages | text,
"chosen": text, "rejected": text} (+ "id", "chosen_reward", "rejected_reward", which the reader ignores). A messages
prompt stays messages, so DPO renders it through the same chat template, generation prompt included, and trains on
the prompt tokens RL sampled after; this is checked prompt by prompt before any answer. A text prompt is kept only
without a chat template: DPO would wrap it in the template again. DPO re-encodes a response's text and closes it
as the template closes an assistant turn; the summary counts the pairs whose text re-encodes to other tokens than
were sampled (``retokenized``) and those where a response the model ended with EOS ends otherwise in DPO
(``end_differs``: a template whose turns end without EOS, e.g. the world's Q:/A: one, which ends them with "\\n").

``--kind sft`` writes ``lucidlm sft --data`` rows instead (``build_sft_rows``): the abstention for the prompts whose
entity the model cannot know, its own best supported answer for the others: a model that never abstains (the
real model) learns when to, and RL then has abstentions to reinforce. ``--balance`` repeats the fewer of the two
within each question type (``balance_by_type``): in the facts demo most cities are unknowable and most elements
known, and unbalanced rows teach the type ("a city: I don't know") instead of the model's own knowledge.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..jsonl import write_jsonl
from ..train.checkpointing import ensure_writable_dir
from ..train.config_file import opt
from ..train.rewards import RLPrompt, Rollout
from ..train.rl_rollouts import encode_prompt
from ..train.sft_data import ChatFormatter
from .rl_eval import grading_for, sampled_rollouts
from .rl_rewards import Grading, VerifiableRewardConfig, graded_row, knowable, verifiable_score


@dataclass
class RLPairsRun:
    model: str | None = opt(None, "checkpoint directory of the model to sample from (the policy RL would train)")
    prompts: list[str] = opt(factory=list, help="JSONL RL prompts with meta (lucidlm rl-prompts)")
    grader: str | None = opt(None, "world:WORLD_DIR or facts: the ground truth the answers are graded against")
    samples: int = opt(4, "sampled answers per prompt (>= 2): the pair is the best and the worst of them")
    out: str | None = opt(None, "the JSONL pairs file to write (lucidlm dpo --data reads it)")
    seed: int = opt(0, "sampling seed (prompt i samples with seed + i, as rl-eval)")
    max_new_tokens: int = opt(48, "tokens per answer at most")
    verifiable: VerifiableRewardConfig = opt(factory=VerifiableRewardConfig, help="points per claim and abstention "
                                             "(as lucidlm rl's --verifiable.*)")
    kind: str = opt("dpo", "dpo: best vs worst pairs; sft: R-Tuning's refusal-aware SFT rows - the abstention on an "
                           "entity the model cannot know (meta knowable false), its best answer with a supported "
                           "claim on the others (none: left out)")
    abstention: str = opt("I don't know.", "sft: the answer written for an entity the model cannot know")
    balance: bool = opt(False, "sft: as many answers as abstentions within each question type (meta type), the "
                               "fewer repeated, so the type alone does not predict the abstention")


def check(run: RLPairsRun) -> None:
    """Everything that can be checked before the model loads."""
    if run.model is None:
        raise ValueError("give the model to sample from: --model DIR")
    if run.grader is None:
        raise ValueError("give the grader: --grader world:WORLD_DIR or facts")
    if not run.prompts:
        raise ValueError("no prompts: give --prompts FILE")
    missing = [p for p in run.prompts if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"prompt files not found: {missing}")
    if run.samples < (2 if run.kind == "dpo" else 1):
        raise ValueError(f"--samples must be >= 2 (a pair needs two answers to compare), got {run.samples}"
                         if run.kind == "dpo" else f"--samples must be >= 1, got {run.samples}")
    if run.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {run.max_new_tokens}")
    if run.out is None:
        raise ValueError("give the pairs file to write: --out FILE")
    if run.kind not in ("dpo", "sft"):
        raise ValueError(f"--kind must be dpo or sft, got {run.kind!r}")
    if run.balance and run.kind != "sft":
        raise ValueError("--balance balances R-Tuning's SFT rows: it needs --kind sft")
    if run.kind == "sft" and not run.abstention.strip():
        raise ValueError("--abstention must be a non-empty answer")
    ensure_writable_dir(Path(run.out).parent, "directory of --out")


def dpo_prompt(prompt: RLPrompt, tokenizer: Any) -> list[dict] | str:
    """The prompt as a DPO row holds it: the messages, or the text when the tokenizer has no chat template."""
    if prompt.messages:
        return [dict(m) for m in prompt.messages]
    if tokenizer.chat_template is not None:
        raise ValueError("a text prompt cannot become a DPO pair with a chat-template tokenizer: DPO would wrap the "
                         "text in the template again and train on other tokens than RL sampled; write the prompts "
                         "as messages (lucidlm rl-prompts)")
    return prompt.text


def check_prompt_tokens(prompts: list[RLPrompt], tokenizer: Any) -> None:
    """DPO's prompt tokens (``ChatFormatter.pair``, everything before the response) must be RL's
    (``encode_prompt``): the template rendered prefix by prefix, no merge across the start of the answer."""
    formatter = ChatFormatter(tokenizer, max_len=1 << 30)
    for i, prompt in enumerate(prompts):
        # a one-word answer: an empty one has no token for the answer's span to start at (after "A: " the
        # answer's first token carries the template's space)
        example = formatter.pair(dpo_prompt(prompt, tokenizer), "I")
        if example.input_ids[: example.prefix_len] != encode_prompt(prompt, tokenizer):
            raise ValueError(f"prompt {i} ({prompt.meta.get('id')!r}): DPO would tokenize it differently from RL "
                             "(the chat template's rendering or a merge across the answer's start)")


def score(grading: Grading, rollout: Rollout, config: VerifiableRewardConfig) -> float:
    """The verifiable reward of one answer, as ``rl_rewards.VerifiableReward`` gives it."""
    row = graded_row(grading, rollout)
    return verifiable_score([a["label"] for a in row["annotations"]], row["abstained"], row["knowable"], config)


def best_and_worst(rewards: list[float]) -> tuple[int, int] | None:
    """(index of the highest reward, of the lowest), the first of each on a tie; None when all are equal."""
    hi, lo = max(rewards), min(rewards)
    return None if hi == lo else (rewards.index(hi), rewards.index(lo))


def token_differences(formatter: ChatFormatter, head: list[dict] | str, rollout: Rollout) -> tuple[bool, bool]:
    """(whether DPO's tokens of the response text differ from those sampled, whether a response the model ended
    with EOS ends otherwise in DPO's rendering: a template that closes the turn without EOS)."""
    example = formatter.pair(head, rollout.text)
    eos = formatter.tokenizer.eos_token_id
    sampled = list(rollout.token_ids)
    stopped = bool(sampled) and sampled[-1] == eos  # the engine's token ids keep the EOS it stopped on
    body = sampled[:-1] if stopped else sampled
    dpo = example.input_ids[example.prefix_len:]
    return dpo[: len(body)] != body, stopped and dpo[len(body): len(body) + 1] != [eos]


def build_pairs(lm: Any, prompts: list[RLPrompt], grading: Grading, samples: int, config: VerifiableRewardConfig,
                max_new_tokens: int = 48, seed: int = 0) -> tuple[list[dict], dict]:
    """(pair rows, summary): ``samples`` answers per prompt, the best and the worst of each as a pair."""
    if samples < 2:
        raise ValueError(f"samples must be >= 2 (a pair needs two answers to compare), got {samples}")
    check_prompt_tokens(prompts, lm.tokenizer)  # before any answer
    answers = sampled_rollouts(lm, prompts, samples, max_new_tokens, seed, greedy=False)
    formatter = ChatFormatter(lm.tokenizer, max_len=1 << 30)
    rows, retokenized, end_differs = [], 0, 0
    for i, prompt in enumerate(prompts):
        group = [rollout for rollout, _ in answers[i * samples: (i + 1) * samples]]
        rewards = [score(grading, r, config) for r in group]
        picked = best_and_worst(rewards)
        if picked is None:
            continue
        head = dpo_prompt(prompt, lm.tokenizer)
        (c, r) = picked
        (text_c, end_c), (text_r, end_r) = (token_differences(formatter, head, group[k]) for k in (c, r))
        retokenized, end_differs = retokenized + (text_c or text_r), end_differs + (end_c or end_r)
        rows.append({"prompt": head, "chosen": group[c].text, "rejected": group[r].text,
                     "id": prompt.meta.get("id"), "chosen_reward": rewards[c], "rejected_reward": rewards[r]})
    mean = (lambda key: sum(row[key] for row in rows) / len(rows)) if rows else (lambda key: math.nan)
    summary = {"prompts": len(prompts), "pairs": len(rows), "skipped_ties": len(prompts) - len(rows),
               "mean_chosen_reward": mean("chosen_reward"), "mean_rejected_reward": mean("rejected_reward"),
               "retokenized": retokenized, "end_differs": end_differs}
    return rows, summary


def build_sft_rows(lm: Any, prompts: list[RLPrompt], grading: Grading, samples: int,
                   config: VerifiableRewardConfig, abstention: str, max_new_tokens: int = 48,
                   seed: int = 0) -> tuple[list[dict], dict]:
    """(SFT rows, summary): R-Tuning (Zhang et al. 2023, refusal-aware instruction tuning) on the model's own
    knowledge - a prompt whose entity it cannot know gets ``abstention`` as its answer, any other its best of
    ``samples`` answers when that one makes a supported claim (its reward > 0), else no row (the model does not
    know it yet, and writing the truth would teach facts rather than when to abstain)."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    for prompt in prompts:
        if not prompt.messages:
            raise ValueError("sft rows are conversations: write the prompts as messages (lucidlm rl-prompts)")
    answers = sampled_rollouts(lm, prompts, samples, max_new_tokens, seed, greedy=False)
    rows = []
    for i, prompt in enumerate(prompts):
        unknowable = not knowable(prompt.meta)
        if unknowable:
            target = abstention
        else:
            group = [rollout for rollout, _ in answers[i * samples: (i + 1) * samples]]
            rewards = [score(grading, r, config) for r in group]
            best = max(range(len(group)), key=rewards.__getitem__)
            if rewards[best] <= 0:
                continue
            target = group[best].text.strip()
        rows.append({"messages": [dict(m) for m in prompt.messages] + [{"role": "assistant", "content": target}],
                     "id": prompt.meta.get("id"), "type": prompt.meta.get("type"), "abstention": unknowable})
    abstained = sum(row["abstention"] for row in rows)
    return rows, {"prompts": len(prompts), "rows": len(rows), "abstentions": abstained,
                  "answers": len(rows) - abstained, "left_out": len(prompts) - len(rows)}


def balance_by_type(rows: list[dict], seed: int) -> tuple[list[dict], dict]:
    """(rows, summary): within each question type the fewer of abstentions and answers repeated in turn up to the
    count of the other, then all shuffled (seeded): ``lucidlm sft`` streams its file in order, and the repeats, like
    the prompts of one type, would otherwise come in blocks. A type with only one kind is kept as it is (nothing to
    balance it with) and named in the summary."""
    by_type: dict[Any, tuple[list[dict], list[dict]]] = {}
    for row in rows:
        abstentions, answers = by_type.setdefault(row.get("type"), ([], []))
        (abstentions if row["abstention"] else answers).append(row)
    added, one_kind = [], []
    for kind, (abstentions, answers) in by_type.items():
        fewer, more = sorted((abstentions, answers), key=len)
        if not fewer:
            one_kind.append(kind)
            continue
        added += [fewer[i % len(fewer)] for i in range(len(more) - len(fewer))]
    balanced = rows + added
    random.Random(seed).shuffle(balanced)
    return balanced, {"repeated": len(added), "unbalanced_types": one_kind}


def run_rl_pairs(run: RLPairsRun) -> dict:
    """Check, load, sample, pair, write ``run.out`` atomically; the summary (+ "out")."""
    from ..api import load
    from ..train.rl_rollouts import read_prompts

    check(run)
    grading, _ = grading_for(run.grader)  # an unknown grader or a world without people fails before the model loads
    prompts = read_prompts(run.prompts)
    lm = load(run.model, compile="off")
    if lm.tokenizer is None:
        raise ValueError(f"{run.model}: no tokenizer.json to encode the prompts with")
    if run.kind == "sft":
        rows, summary = build_sft_rows(lm, prompts, grading, run.samples, run.verifiable, run.abstention,
                                       run.max_new_tokens, run.seed)
        if run.balance:
            rows, balanced = balance_by_type(rows, run.seed)
            summary |= balanced | {"rows": len(rows)}
        write_jsonl(Path(run.out), rows)
        return summary | {"out": run.out}
    rows, summary = build_pairs(lm, prompts, grading, run.samples, run.verifiable, run.max_new_tokens, run.seed)
    if not rows:
        raise ValueError(f"every one of the {len(prompts)} prompts' {run.samples} answers scored the same: no pair to "
                         "write (more --samples, or a model whose answers differ)")
    write_jsonl(Path(run.out), rows)
    return summary | {"out": run.out}
