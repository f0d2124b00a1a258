"""Choosing the probe's alignment, layer and regularisation on a validation split — never on the test split.

Stage 1 fits one head per (alignment, layer) at the default l2 and ranks them by span-max AUROC on
the validation examples; stage 2 tries each l2 of a grid at the winner. Every fit reads stored
features (features.py), so the whole search costs one forward per conversation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from sklearn.metrics import roc_auc_score

from .evaluate import span_arrays
from .features import TokenFeatures
from .probe import ProbeHead
from .train import ProbeTrainConfig, fit_head

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


@dataclass
class Selection:
    head: ProbeHead
    config: ProbeTrainConfig  # the chosen layer, alignment and l2
    val_auroc: float
    table: list[dict]  # every fit: {"alignment", "layer", "l2", "val_auroc"}


def val_auroc(head: ProbeHead, val: TokenFeatures, layer: int, alignment: str) -> float:
    scores, labels = span_arrays(val, head.scores(val.features(layer, alignment)).detach())
    return float(roc_auc_score(labels, scores))


def select_probe(train: TokenFeatures, val: TokenFeatures, layers: Sequence[int], alignments: Sequence[str],
                 config: ProbeTrainConfig, l2_grid: Sequence[float] = L2_GRID) -> Selection:
    """The best head by validation span-max AUROC (features of both sets must hold every layer/alignment)."""
    table: list[dict] = []
    best: tuple[float, ProbeHead, ProbeTrainConfig] | None = None

    def fit(cfg: ProbeTrainConfig) -> None:
        nonlocal best
        head = fit_head(train.features(cfg.layer, cfg.alignment), train, cfg)
        auroc = val_auroc(head, val, cfg.layer, cfg.alignment)
        table.append({"alignment": cfg.alignment, "layer": cfg.layer, "l2": cfg.l2, "val_auroc": auroc})
        if best is None or auroc > best[0]:
            best = (auroc, head, cfg)

    for alignment in alignments:
        for layer in layers:
            fit(replace(config, layer=layer, alignment=alignment))
    winner = best[2]
    for l2 in l2_grid:
        if l2 != winner.l2:
            fit(replace(winner, l2=l2))
    auroc, head, cfg = best
    return Selection(head, cfg, auroc, table)
