"""Run by test_trainer.py in a subprocess: train a tiny model in OUT_DIR for STEPS steps (resuming when possible).
With PAUSE > 0: once step PAUSE is done, write OUT_DIR.paused and wait there to be killed (the test kills the run at a
known step, however fast or slow the machine is)."""

import sys
import time
from pathlib import Path

import torch

from lucidlm.config import from_preset
from lucidlm.model.transformer import Transformer
from lucidlm.train.trainer import TrainConfig, Trainer

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from synthetic_data import FixedValData, ProgressionData  # noqa: E402

out_dir, steps, pause = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
model = Transformer(from_preset("llama-125m", tiny=True, vocab_size=64))
model.init_weights(torch.Generator().manual_seed(0))
config = TrainConfig(out_dir=out_dir, max_steps=steps, lr=3e-3, warmup_steps=3, save_every=4, eval_every=5,
                     grad_accum=2, progress=False)
trainer = Trainer(model, config, ProgressionData(), FixedValData())
if pause:  # stop between checkpoints, with steps logged past the last one, until the test kills us
    step = trainer._train_step

    def pausing_step():
        if trainer.step == pause:
            Path(out_dir + ".paused").write_text(str(pause))
            while True:
                time.sleep(60)
        return step()

    trainer._train_step = pausing_step
last = trainer.fit()
print(f"FINAL {last['loss']!r} {sum(float(p.double().sum()) for p in model.parameters())!r}")
