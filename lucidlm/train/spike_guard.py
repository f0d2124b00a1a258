"""Loss-spike guard: skip a step whose loss jumps far above the recent mean; roll back when it keeps happening.

Large runs see sudden loss spikes (PaLM §5.1, OPT's logbook): a bad batch or an unstable update
throws the weights somewhere the run may never recover from. The guard compares each step's loss
with the mean of the last ``window`` accepted losses: above ``factor`` × that mean the update is
not applied (the batch is skipped and logged). ``max_spikes`` spikes in a row mean the weights
themselves have gone bad: the trainer reloads the last checkpoint and lowers the learning rate.
"""

from __future__ import annotations

from collections import deque
from enum import StrEnum


class Verdict(StrEnum):
    OK = "ok"
    SKIP = "skip"
    ROLLBACK = "rollback"


class SpikeGuard:
    def __init__(self, factor: float = 3.0, window: int = 20, max_spikes: int = 3, min_history: int = 5) -> None:
        if factor <= 1.0 or window < 1 or max_spikes < 1:
            raise ValueError(f"spike guard needs factor > 1, window >= 1, max_spikes >= 1; got {factor}, "
                             f"{window}, {max_spikes}")
        self.factor, self.window, self.max_spikes, self.min_history = factor, window, max_spikes, min_history
        self.history: deque[float] = deque(maxlen=window)
        self.in_a_row = 0

    def check(self, loss: float) -> Verdict:
        """Judge a step's loss; accepted losses join the running mean."""
        spike = (loss != loss) or (len(self.history) >= self.min_history  # NaN is always a spike
                                   and loss > self.factor * sum(self.history) / len(self.history))
        if not spike:
            self.history.append(loss)
            self.in_a_row = 0
            return Verdict.OK
        self.in_a_row += 1
        if self.in_a_row >= self.max_spikes:
            self.in_a_row = 0
            return Verdict.ROLLBACK
        return Verdict.SKIP

    def state_dict(self) -> dict:
        return {"history": list(self.history), "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.history = deque(state["history"], maxlen=self.window)
        self.in_a_row = state["in_a_row"]
