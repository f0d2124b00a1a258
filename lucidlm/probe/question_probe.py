"""Does the model know the answer before it writes one? A linear probe on the question (P(IK), Kadavath et al.
2022, "Language Models (Mostly) Know What They Know").

The token probe (probe.py) reads a claim after it is written; a decision to abstain is taken before. This probe
reads one hidden state per question — block L's output at the prompt's last token, the state the first answer
token is sampled from — and scores the chance that the model cannot answer (1 − P(IK)):

    prompt ids ─forward (hidden_layers)─▶ h_L[last prompt token]  (dim,)  ─standardise─▶ logistic regression
    label 1: a question the model cannot answer (a facts question it got wrong in every sample, a world stranger)

Features are few (one per question), so the head is scikit-learn's L2 logistic regression on standardised
states, its strength C and the layer chosen by out-of-fold AUROC (stratified folds over the training
questions, averaged over several shuffled splits: one split's choice among close layers is noise), the scaler
folded into one Linear(dim, 1) (a ProbeHead, saved like a probe). The out-of-fold scores are kept beside it: a
question the head was fit on has no honest score of its own, so a threshold tuned on the training questions
(``lucidlm rl-gate``) uses those instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..jsonl import read_json, write_json
from ..progress import progress_bar
from .claims import auroc
from .probe import (
    QUESTION_FILE,
    ProbeConfig,
    ProbeError,
    ProbeHead,
    check_fits,
    decoder_blocks,
    hidden_size_of,
    load_probe,
    save_probe,
)

C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # inverse L2 strengths tried (standardised features: 576 dims, ~100 rows)


@torch.no_grad()
def question_states(model: nn.Module, prompts: list[list[int]], layers: list[int], pad_id: int,
                    batch_size: int = 16, progress: bool | None = None) -> dict[int, torch.Tensor]:
    """layer -> (N, dim) float32: block ``layer``'s output at each prompt's last token. Prompts are right-padded
    (causal attention: a real token never sees the padding after it), sorted by length to pad little."""
    if not prompts or any(not p for p in prompts):
        raise ValueError("question_states needs non-empty prompts")
    device = next(model.parameters()).device
    model.eval()
    out = {layer: torch.empty(len(prompts), hidden_size_of(model)) for layer in layers}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    with progress_bar(len(order), "question states", progress) as advance:
        for start in range(0, len(order), batch_size):
            _states_batch(model, prompts, order[start:start + batch_size], layers, pad_id, device, out)
            advance(min(batch_size, len(order) - start))
    return out


def _states_batch(model: nn.Module, prompts: list[list[int]], rows: list[int], layers: list[int], pad_id: int,
                  device: torch.device, out: dict[int, torch.Tensor]) -> None:
    """One right-padded forward over ``rows``; each row's last real position written into ``out``."""
    width = max(len(prompts[i]) for i in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, i in enumerate(rows):
        ids[r, :len(prompts[i])] = torch.tensor(prompts[i])
        mask[r, :len(prompts[i])] = 1
    hidden = model.forward_outputs(ids.to(device), mask.to(device), hidden_layers=layers).hidden_states
    last = torch.tensor([len(prompts[i]) - 1 for i in rows], device=device)
    for layer in layers:
        out[layer][rows] = hidden[layer][torch.arange(len(rows), device=device), last].float().cpu()


def _logistic(c: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))


def out_of_fold(x: np.ndarray, y: np.ndarray, c: float, folds: int, seed: int, repeats: int) -> np.ndarray:
    """(repeats, N) each question's P(label 1) from heads fit on the other folds: ``repeats`` stratified splits
    (shuffled with seed + r), so that a choice made on them is not one split's luck."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    return np.stack([cross_val_predict(_logistic(c), x, y, method="predict_proba",
                                       cv=StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed + r))[:, 1]
                     for r in range(repeats)])


def folded_head(x: np.ndarray, y: np.ndarray, c: float) -> ProbeHead:
    """The standardised logistic regression fit on all of (x, y), as one Linear on the raw state:
    w·(h − μ)/σ + b = (w/σ)·h + (b − Σ w μ/σ)."""
    pipe = _logistic(c).fit(x, y)
    scaler, clf = pipe[0], pipe[1]
    w = clf.coef_[0] / scaler.scale_
    head = ProbeHead(x.shape[1])
    with torch.no_grad():
        head.linear.weight.copy_(torch.tensor(w, dtype=torch.float32)[None])
        head.linear.bias.fill_(float(clf.intercept_[0] - (w * scaler.mean_).sum()))
    return head.requires_grad_(False).eval()  # fitted in closed form: nothing trains it further


@dataclass
class QuestionProbeFit:
    layer: int
    c: float
    head: ProbeHead
    out_of_fold: np.ndarray  # (N,) the chosen layer's and C's out-of-fold scores, averaged over the repeats
    cv_auroc: dict[int, float]  # layer -> best mean out-of-fold AUROC over C


def fit_question_probe(states: dict[int, torch.Tensor], labels: np.ndarray, folds: int = 5, seed: int = 0,
                       c_grid: tuple[float, ...] = C_GRID, repeats: int = 5) -> QuestionProbeFit:
    """Layer and C by out-of-fold AUROC, the mean over ``repeats`` splits (ties: the earlier layer, the smaller C),
    then the head fit on all rows."""
    labels = np.asarray(labels, dtype=int)
    fewest = min(int(labels.sum()), int((1 - labels).sum()))
    if fewest < folds:
        raise ValueError(f"a question probe needs at least {folds} questions of each class (answerable and not) "
                         f"for {folds}-fold selection; these prompts have {int((1 - labels).sum())} and "
                         f"{int(labels.sum())}")
    best: dict[int, tuple[float, float, np.ndarray]] = {}
    for layer, x in states.items():
        for c in c_grid:
            oof = out_of_fold(x.numpy(), labels, c, folds, seed, repeats)
            score = float(np.mean([auroc(split, labels) for split in oof]))
            if layer not in best or score > best[layer][0]:
                best[layer] = (score, c, oof.mean(0))
    layer = max(best, key=lambda k: (best[k][0], -k))
    score, c, oof = best[layer]
    return QuestionProbeFit(layer, c, folded_head(states[layer].numpy(), labels, c), oof,
                            {k: v[0] for k, v in sorted(best.items())})


def save_question_probe(directory: str | Path, fit: QuestionProbeFit, ids: list[str], model: nn.Module) -> Path:
    """A probe directory (head, config with the model's identity) + question_probe.json: C, the layers' AUROCs
    and each training question's out-of-fold score by id."""
    config = ProbeConfig(layer=fit.layer, hidden_size=hidden_size_of(model), n_layers=len(decoder_blocks(model)),
                         alignment="own")
    directory = save_probe(directory, fit.head, config, model)
    meta = {"kind": "question", "c": fit.c, "cv_auroc": {str(k): v for k, v in fit.cv_auroc.items()},
            "out_of_fold": dict(zip(ids, map(float, fit.out_of_fold)))}
    write_json(directory / QUESTION_FILE, meta)
    return directory


@dataclass
class QuestionProbe:
    head: ProbeHead
    config: ProbeConfig
    out_of_fold: dict[str, float]  # training question id -> its out-of-fold score

    def risks(self, model: nn.Module, ids: list[str], prompts: list[list[int]], pad_id: int,
              progress: bool | None = None) -> list[float]:
        """Each question's score (1 − P(IK)); a question the head was fit on gets its out-of-fold score (and no
        forward)."""
        new = [k for k, i in enumerate(ids) if i not in self.out_of_fold]
        fresh: dict[int, float] = {}
        if new:
            states = question_states(model, [prompts[k] for k in new], [self.config.layer], pad_id,
                                     progress=progress)[self.config.layer]
            fresh = dict(zip(new, self.head.scores(states.to(self.head.linear.weight.device)).cpu().tolist()))
        return [self.out_of_fold[i] if i in self.out_of_fold else fresh[k] for k, i in enumerate(ids)]


def load_question_probe(directory: str | Path, model: nn.Module) -> QuestionProbe:
    """The question probe in ``directory`` for ``model`` (shape and identity checked; a token probe is refused)."""
    directory = Path(directory)
    head, config = load_probe(directory, question=True)
    check_fits(config, model, directory)
    meta = read_json(directory / QUESTION_FILE)
    oof = meta.get("out_of_fold") if isinstance(meta, dict) else None
    if not isinstance(oof, dict) or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                            for v in oof.values()):
        raise ProbeError(f"{directory / QUESTION_FILE}: expected an object with 'out_of_fold': {{id: score}}")
    return QuestionProbe(head.to(next(model.parameters()).device), config, {str(k): float(v) for k, v in oof.items()})
