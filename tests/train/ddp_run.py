"""Run by test_distributed.py (under torchrun, or alone): a few steps on a tiny model; rank 0 prints the losses."""

import json
import sys

import torch

from lucidlm.config import from_preset
from lucidlm.model.transformer import Transformer
from lucidlm.train.distributed import DistributedTrainer
from lucidlm.train.metrics import read_metrics
from lucidlm.train.trainer import TrainConfig

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from synthetic_data import ProgressionData  # noqa: E402

out_dir, grad_accum, strategy = sys.argv[1], int(sys.argv[2]), sys.argv[3]
save_every = int(sys.argv[4]) if len(sys.argv) > 4 else 3
model = Transformer(from_preset("llama-125m", tiny=True, vocab_size=64))
model.init_weights(torch.Generator().manual_seed(0))
config = TrainConfig(out_dir=out_dir, max_steps=6, lr=3e-3, warmup_steps=2, grad_accum=grad_accum,
                     save_every=save_every, progress=False, device="cpu")
trainer = DistributedTrainer(model, config, ProgressionData(batch=2), strategy=strategy)
trainer.fit()
if trainer.is_main:
    print("LOSSES " + json.dumps([r["loss"] for r in read_metrics(trainer.out_dir / "metrics.jsonl")]))
