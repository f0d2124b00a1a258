"""What ``lucidlm probe question`` does, and how ``rl-eval --question-probe`` scores each question: RL prompts
(``lucidlm rl-prompts``, each with ``meta.knowable``) in, a question probe (probe/question_probe.py) out.

The label is the prompt's own ``knowable`` flag (facts: the model answered it right in some sample before; the
world: the person is in the corpus); the prompt is encoded as the RL rollouts and rl-eval encode it
(rl_rollouts.encode_prompt), so the probed state is the one the first answer token is sampled from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..probe.question_probe import fit_question_probe, load_question_probe, question_states, save_question_probe
from ..tokenizer import pad_id
from ..train.checkpointing import ensure_writable_dir
from ..train.rewards import RLPrompt
from ..train.rl_rollouts import encode_prompt, read_prompts
from .rl_rewards import meta_id

DEFAULT_LAYERS = (0.2, 0.35, 0.5, 0.65, 0.8, 0.95)  # fractions of the depth swept when no layers are given


def prompt_id(prompt: RLPrompt) -> str:
    """The id rl-eval's rows carry (rl_rewards.meta_id), required here."""
    key = meta_id(prompt.meta)
    if key is None:
        raise ValueError("a prompt without meta 'id' or 'name': question probes need rl-prompts' prompts")
    return str(key)


def knowable_labels(prompts: list[RLPrompt]) -> np.ndarray:
    """(N,) 1 for a prompt whose meta says knowable = false (what the probe should flag), 0 for knowable."""
    bad = [prompt_id(p) for p in prompts if not isinstance(p.meta.get("knowable"), bool)]
    if bad:
        raise ValueError(f"prompts without a true/false meta 'knowable' (e.g. {bad[0]!r}): a question probe learns "
                         "it, so its prompts come from `lucidlm rl-prompts`")
    return np.array([0 if p.meta["knowable"] else 1 for p in prompts])


def swept_layers(layers: list[int], n_layers: int) -> list[int]:
    """The given blocks (negative: from the end), checked; none: DEFAULT_LAYERS of the depth."""
    if not layers:
        return sorted({min(n_layers - 1, round(f * n_layers)) for f in DEFAULT_LAYERS})
    bad = [x for x in layers if not -n_layers <= x < n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range for a model of {n_layers} blocks")
    return sorted({x % n_layers for x in layers})


def train_question_probe(model: str | Path, prompt_files: list[str | Path], out: str | Path,
                         layers: list[int] = (), folds: int = 5, repeats: int = 5, seed: int = 0) -> dict:
    """Fit and save the probe; the summary: layer, C, the swept layers' out-of-fold AUROC, class counts."""
    from ..api import load

    prompts = read_prompts(prompt_files)
    labels = knowable_labels(prompts)  # bad prompts fail before the model is loaded
    ensure_writable_dir(out, "question probe directory")
    lm = load(model, compile="off")
    swept = swept_layers(list(layers), lm.model.config.n_layers)
    ids = [encode_prompt(p, lm.tokenizer) for p in prompts]
    fit = fit_question_probe(question_states(lm.model, ids, swept, pad_id(lm.tokenizer)), labels, folds, seed,
                             repeats=repeats)
    save_question_probe(out, fit, [prompt_id(p) for p in prompts], lm.model)
    return {"layer": fit.layer, "c": fit.c, "cv_auroc": fit.cv_auroc, "questions": len(prompts),
            "unknowable": int(labels.sum()), "out": str(out)}


def question_risks(lm: Any, directory: str | Path, prompts: list[RLPrompt]) -> dict[str, float]:
    """prompt id -> the question probe's score on ``lm`` (out-of-fold for the questions it was fit on)."""
    probe = load_question_probe(directory, lm.model)
    ids = [prompt_id(p) for p in prompts]
    encoded = [encode_prompt(p, lm.tokenizer) for p in prompts]
    return dict(zip(ids, probe.risks(lm.model, ids, encoded, pad_id(lm.tokenizer))))
