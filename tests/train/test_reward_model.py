"""Reward model: the Bradley–Terry loss by hand, the head on the last real token (either padding side), the trainer
learning a synthetic preference to high held-out accuracy, save/load round trips (head only and LoRA), bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lucidlm.config import from_preset
from lucidlm.jsonl import DataError
from lucidlm.model.lora import LoRAConfig, apply_lora
from lucidlm.model.transformer import Transformer
from lucidlm.tokenizer import byte_tokenizer
from lucidlm.train.reward_model import (
    CONFIG_FILE,
    HEAD_FILE,
    BradleyTerry,
    RewardModel,
    RewardModelError,
    RewardPairDataset,
    accuracy_ci,
    bradley_terry_loss,
    fill_reward_model,
    load_reward_model,
    pair_rewards,
    save_reward_model,
)
from lucidlm.train.trainer import TrainConfig, Trainer

MARK = 3  # the token only chosen responses contain


def tiny(seed: int = 0, **overrides) -> Transformer:
    model = Transformer(from_preset("llama-125m", tiny=True, vocab_size=32, **overrides))
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def pairs(k: int, n: int = 8) -> dict[str, torch.Tensor]:
    """A prompt of 4 tokens and responses of 3..6 tokens, right-padded; the chosen one ends with MARK (so a head
    reading a padding position instead of the last real token learns nothing)."""
    g = torch.Generator().manual_seed(k)
    out = {}
    prompt = torch.randint(8, 32, (n, 4), generator=g)
    for side in ("chosen", "rejected"):
        lengths = torch.randint(3, 7, (n,), generator=g)
        response = torch.randint(8, 32, (n, 6), generator=g)
        if side == "chosen":
            response[torch.arange(n), lengths - 1] = MARK
        mask = torch.cat([torch.ones(n, 4, dtype=torch.long), (torch.arange(6) < lengths[:, None]).long()], 1)
        ids = torch.cat([prompt, response], 1) * mask
        out |= {f"{side}_input_ids": ids, f"{side}_labels": ids, f"{side}_attention_mask": mask}
    return out


class PairData:
    def __init__(self) -> None:
        self.pos = 0

    def __iter__(self):
        while True:
            self.pos += 1
            yield pairs(self.pos)

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


def test_bradley_terry_loss_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 3.0])
    expected = [math.log1p(math.exp(-1.0)), math.log(2.0), math.log1p(math.exp(2.0))]  # −log σ(d) = log(1 + e^−d)
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), torch.tensor(expected))
    with_margin = bradley_terry_loss(chosen, rejected, torch.tensor([0.5, 0.0, 0.0]))
    assert with_margin[0].item() == pytest.approx(math.log1p(math.exp(-0.5)))
    with pytest.raises(ValueError, match="one shape"):
        bradley_terry_loss(chosen, rejected[:2])


def test_the_head_reads_the_last_real_token_whatever_the_padding():
    model = RewardModel(tiny(), generator=torch.Generator().manual_seed(1)).eval()
    rows = [[5, 9, 11, 13, 2], [7, 8], [20, 21, 22]]
    longest = max(map(len, rows))
    right = torch.tensor([r + [0] * (longest - len(r)) for r in rows])
    left = torch.tensor([[0] * (longest - len(r)) + r for r in rows])
    right_mask, left_mask = (right != 0).long(), (left != 0).long()
    with torch.no_grad():
        r_right, r_left = model(right, right_mask), model(left, left_mask)
        # reference: each row alone, unpadded, through the LM's final norm at its last position
        alone = []
        for r in rows:
            out = model.base.forward_outputs(torch.tensor([r]), hidden_layers=[-1])
            alone.append(model.head(model.base.norm(out.hidden_states[1][0, -1])).item())
    torch.testing.assert_close(r_right, torch.tensor(alone), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r_left, torch.tensor(alone), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no real token"):
        model(right, torch.zeros_like(right))


def test_objective_is_the_loss_of_the_pairs_rewards():
    model = RewardModel(tiny())
    batch = pairs(0, n=4) | {"margin": torch.tensor([0.0, 1.0, 0.0, 2.0])}
    parts = BradleyTerry()(model, batch)
    with torch.no_grad():
        chosen = model(batch["chosen_input_ids"], batch["chosen_attention_mask"])
        rejected = model(batch["rejected_input_ids"], batch["rejected_attention_mask"])
    assert parts.tokens == 4 and BradleyTerry.count(batch) == 4
    torch.testing.assert_close(parts.loss_sum.detach(), bradley_terry_loss(chosen, rejected, batch["margin"]).sum())
    assert parts.metrics["accuracy"] == float((chosen > rejected).float().mean())


def test_training_learns_the_preference_on_held_out_pairs(tmp_path):
    model = RewardModel(tiny(), generator=torch.Generator().manual_seed(0))
    held_out = [pairs(10_000 + i) for i in range(4)]  # 32 pairs never trained on
    before = accuracy_ci(*pair_rewards(model, held_out))
    config = TrainConfig(out_dir=str(tmp_path / "rm"), max_steps=12, lr=3e-2, warmup_steps=2, weight_decay=0.0,
                         save_every=1000, eval_every=1000, progress=False)
    Trainer(model, config, PairData(), objective=BradleyTerry(), save_weights=save_reward_model,
            load_weights=fill_reward_model).fit()
    after = accuracy_ci(*pair_rewards(model, held_out))
    assert before["accuracy"] < 0.7 and after["accuracy"] >= 0.95 and after["lo"] > 0.85
    assert all(not p.requires_grad for p in model.base.parameters())  # the base stayed frozen: head only


def test_save_load_round_trip_head_only_and_lora(tmp_path):
    batch = pairs(3)
    for lora in (False, True):
        base = tiny()
        if lora:
            apply_lora(base, LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj")))
            with torch.no_grad():
                for name, p in base.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.1)
        model = RewardModel(base, generator=torch.Generator().manual_seed(2)).eval()
        where = save_reward_model(model, tmp_path / f"rm-{lora}", base_model="base/")
        config = json.loads((where / CONFIG_FILE).read_text())
        assert config["has_adapter"] is lora and config["base_model"] == "base/"
        assert (where / "adapter_model.safetensors").exists() is lora
        loaded = load_reward_model(where, tiny())
        ids, mask = batch["chosen_input_ids"], batch["chosen_attention_mask"]
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids, mask), model(ids, mask))
        if lora:  # the adapter is part of the reward: without it the rewards differ
            with torch.no_grad():
                plain = RewardModel(tiny(), loaded.head)(ids, mask)
            assert not torch.allclose(plain, model(ids, mask))


def test_load_refuses_another_base_model_and_broken_files(tmp_path):
    where = save_reward_model(RewardModel(tiny()), tmp_path / "rm")
    with pytest.raises(RewardModelError, match="another base model"):
        load_reward_model(where, tiny(seed=1))  # same shape, other weights
    with pytest.raises(RewardModelError, match="hidden size 64"):
        load_reward_model(where, tiny(dim=32))
    config = json.loads((where / CONFIG_FILE).read_text())
    (where / CONFIG_FILE).write_text(json.dumps({**config, "n_layers": "two"}))
    with pytest.raises(RewardModelError, match="n_layers must be an integer"):
        load_reward_model(where, tiny())
    (where / CONFIG_FILE).write_text(json.dumps(config))
    (where / HEAD_FILE).write_bytes(b"not safetensors")
    with pytest.raises(RewardModelError, match="not a readable safetensors"):
        load_reward_model(where, tiny())
    with pytest.raises(FileNotFoundError, match="not a reward model directory"):
        load_reward_model(tmp_path, tiny())
    model = RewardModel(tiny())
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(RewardModelError, match="NaN"):
        save_reward_model(model, tmp_path / "nan")


def test_dataset_reads_margins_and_names_malformed_rows(tmp_path):
    rows = [{"prompt": "Q?", "chosen": "yes", "rejected": "no", "margin": 2},
            {"prompt": "Q?", "chosen": "sure", "rejected": "never"}]
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    batch = next(iter(RewardPairDataset([good], byte_tokenizer(), max_len=32, batch_size=2, epochs=1)))
    assert batch["margin"].tolist() == [2.0, 0.0] and batch["chosen_input_ids"].shape[0] == 2
    for bad, message in (({"prompt": "Q?", "chosen": "a", "rejected": "b", "margin": "big"}, "margin"),
                         ({"prompt": "Q?", "chosen": "a"}, "rejected"),
                         ({"prompt": "Q?", "chosen": 3, "rejected": "b"}, "chosen")):
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(bad) + "\n")
        with pytest.raises(DataError, match=message):
            next(iter(RewardPairDataset([path], byte_tokenizer(), max_len=32, batch_size=1, epochs=1)))


def test_accuracy_ci_counts_ties_half_and_brackets_the_estimate():
    report = accuracy_ci(torch.tensor([1.0, 2.0, 0.0, 5.0]), torch.tensor([0.0, 2.0, 1.0, 4.0]), n_boot=500)
    assert report["accuracy"] == pytest.approx(2.5 / 4) and report["pairs"] == 4
    assert 0.0 <= report["lo"] <= report["accuracy"] <= report["hi"] <= 1.0
    with pytest.raises(ValueError, match="n >= 1"):
        accuracy_ci(torch.tensor([]), torch.tensor([]))


def test_resume_from_a_checkpoint_ends_where_an_uninterrupted_run_does(tmp_path):
    def run(out: str, steps: int) -> RewardModel:
        model = RewardModel(tiny(), generator=torch.Generator().manual_seed(0))
        config = TrainConfig(out_dir=str(tmp_path / out), max_steps=steps, lr=1e-2, warmup_steps=1, min_lr_ratio=1.0,
                             save_every=3, eval_every=1000, progress=False)
        Trainer(model, config, PairData(), objective=BradleyTerry(), save_weights=save_reward_model,
                load_weights=fill_reward_model).fit()
        return model

    whole = run("whole", 6)
    run("halves", 3)
    resumed = run("halves", 6)  # a fresh head, filled from the step-3 checkpoint (constant lr: same schedule)
    torch.testing.assert_close(resumed.head.weight, whole.head.weight)
