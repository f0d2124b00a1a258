"""``Linear``: a linear layer, y = x Wᵀ + b.

``nn.Linear`` with the same parameters and state-dict names. On CPU its product goes through
``cpu_kernels.linear``, which picks a faster kernel where one applies (oneDNN-packed weights after
``cpu_kernels.pack_linears``, the compiled batch-1 matrix-vector form, oneDNN fp32 training GEMMs) and
otherwise is ``F.linear``; elsewhere it is ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":  # the dispatch point to the CPU fast paths (cpu_kernels.py)
            return cpu_kernels.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
