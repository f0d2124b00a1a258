"""`lucidlm rl` as a user runs it: GRPO with a reward model and LoRA writes a PEFT adapter that lucidlm.load applies,
PPO writes the model with its value head, and bad input (algorithm, reward spec, prompts) is named before the
model loads."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lucidlm.api import load
from lucidlm.apps.cli import app
from lucidlm.checkpoint import FAMILIES, save_model
from lucidlm.config import from_preset
from lucidlm.model.transformer import Transformer
from lucidlm.random_checkpoint import CHAT_TEMPLATE
from lucidlm.tokenizer import byte_tokenizer
from lucidlm.train.reward_model import RewardModel, save_reward_model

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    tok = byte_tokenizer()
    model = Transformer(from_preset("llama-125m", tiny=True, vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id,
                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    model.init_weights(torch.Generator().manual_seed(0))
    save_model(model, root / "base", FAMILIES["llama"])
    tok.save(root / "base")
    (root / "base" / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    rm = RewardModel(model, generator=torch.Generator().manual_seed(1))
    save_reward_model(rm, root / "rm", FAMILIES["llama"], str(root / "base"))
    rows = [{"prompt": "Where does Ada live?", "meta": {"id": 1}},
            {"messages": [{"role": "user", "content": "Who is Bo?"}]}, {"prompt": "Name a town."}]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _rl(files, tmp_path, *extra):
    return runner.invoke(app, ["rl", "--model", str(files / "base"), "--prompts", str(files / "prompts.jsonl"),
                               "--rl.group-size", "2", "--rl.prompts-per-step", "2", "--rl.max-new-tokens", "3",
                               "--train.warmup-steps", "1", "--train.out-dir", str(tmp_path / "run"), *extra])


def test_grpo_with_a_reward_model_and_lora_writes_an_adapter(files, tmp_path):
    result = _rl(files, tmp_path, "--algo", "grpo", "--reward", "model:" + str(files / "rm"), "--lora",
                 "--lora.r", "2", "--train.max-steps", "2", "--out", str(tmp_path / "adapter"))
    assert result.exit_code == 0, result.output
    last = json.loads(result.output.splitlines()[0])
    assert last["step"] == 2 and "reward_model" in last and "clip_frac" in last and "kl" in last
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "run" / "reward_curve.png").stat().st_size > 1000  # the reward curve is drawn
    lm = load(files / "base", adapter=tmp_path / "adapter", compile="off")
    assert len(lm.generate("Hi", max_new_tokens=2)[0].token_ids) >= 1


def test_ppo_writes_the_model_with_its_value_head(files, tmp_path):
    result = _rl(files, tmp_path, "--algo", "ppo", "--reward", "model:" + str(files / "rm"),
                 "--train.max-steps", "1")
    assert result.exit_code == 0, result.output
    out = tmp_path / "run" / "model"
    assert {"model.safetensors", "value_head.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert "value_loss" in json.loads(result.output.splitlines()[0])


@pytest.mark.parametrize("extra, message", [
    (["--algo", "reinforce", "--reward", "model:x"], "unknown RL algorithm 'reinforce'"),
    (["--reward", "nope:1"], "unknown reward 'nope'"),
    (["--algo", "grpo", "--reward", "model:x", "--rl.group-size", "1"], "group_size must be >= 2"),
    (["--reward", "model:x", "--reward", "model:y", "--reward-weights", "1"], "1 --reward-weights for 2"),  # repeats
    (["--reward", "model:x,model:y,model:z", "--reward-weights", "1,2"], "2 --reward-weights for 3"),  # commas
    ([], "no reward"),
    (["--reward", "model:x", "--verifiable.abstain-known", "-1"], "--verifiable.* options configure the ground"),
    (["--reward", "facts", "--verifiable.aggregate", "median"], "aggregate must be 'sum' or 'mean'"),
])
def test_bad_input_is_named_before_the_model_loads(files, tmp_path, extra, message):
    result = runner.invoke(app, ["rl", "--model", str(tmp_path / "not-a-model"), "--prompts",
                                 str(files / "prompts.jsonl"), "--train.out-dir", str(tmp_path / "run"), *extra])
    assert result.exit_code != 0 and message in str(result.exception), result.output


def test_empty_prompts_are_named(files, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = runner.invoke(app, ["rl", "--model", str(tmp_path / "not-a-model"), "--prompts", str(empty),
                                 "--reward", "model:x", "--train.out-dir", str(tmp_path / "run")])
    assert result.exit_code != 0 and "no prompts" in str(result.exception)


def test_verifiable_options_reach_the_ground_truth_reward():
    from lucidlm.apps.rl_recipes import build_reward
    from lucidlm.apps.rl_rewards import VerifiableRewardConfig

    config = VerifiableRewardConfig(abstain_known=-2.0, aggregate="mean")
    assert build_reward("facts", "", None, config).config == config
