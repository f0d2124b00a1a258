"""The model's own probability of abstaining: a baseline a probe has to beat.

The world's corpus answers a name it holds no facts for with "I know nothing about X." (the
strangers' Q&As), so a model trained on it learns a "do I know X?" decision, and that decision shows
in what it would say first: P(abstention opening | "Q: Tell me about X.\\nA:"), read on the question
alone — without the forced opening the answers are generated after (``answers.prompt_ids``), since
the forced opening is exactly what takes the choice away. Every claim of an answer about X gets X's
score (higher = more likely made up), so it runs through the same span-max machinery as the probe.
"""

from __future__ import annotations

import torch

from .texts import ABSTENTION_OPENING


def abstention_context(lm, question: str) -> tuple[list[int], list[int]]:
    """(context ids, opening ids): the chat-templated question up to "A:" and the abstention's opening.

    A template that ends the generation prompt with a space ("A: ") leaves it to the next token, as
    the corpus tokenizes it (" I"), so the context stops before the trailing spaces and the opening
    starts with them. Raises if the tokenizer merges the opening into the context's last token."""
    head = lm.tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    context = head.rstrip(" ")
    space = head[len(context):] or " "
    ctx = lm.encode(context)
    full = lm.encode(context + space + ABSTENTION_OPENING)
    if full[:len(ctx)] != ctx or len(full) == len(ctx):
        raise ValueError(f"the abstention opening does not start a new token after {context[-20:]!r}")
    return ctx, full[len(ctx):]


@torch.no_grad()
def abstention_logprob(lm, question: str, tokens: int | None = None) -> float:
    """log P(the first ``tokens`` tokens of the abstention opening | the question), all of them by
    default: Σ_k log p(o_k | context, o_<k) under the model, from one forward."""
    ctx, opening = abstention_context(lm, question)
    opening = opening[:tokens] if tokens is not None else opening
    if not opening:
        raise ValueError("tokens must be >= 1")
    ids = torch.tensor([ctx + opening], device=lm.device)
    logits = lm.model(ids)
    logits = getattr(logits, "logits", logits)
    logp = torch.log_softmax(logits[0, len(ctx) - 1:-1].float(), -1)
    return float(logp.gather(-1, ids[0, len(ctx):, None]).sum())


def abstention_scores(lm, questions: list[str], tokens: int | None = None) -> dict[str, float]:
    """{question: P(the model starts its answer with the abstention)} for each distinct question."""
    return {q: float(torch.tensor(abstention_logprob(lm, q, tokens)).exp()) for q in dict.fromkeys(questions)}
