"""`lucidlm generate` and `lucidlm chat` on a checkpoint directory, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import lucidlm
from lucidlm.apps.cli import app
from lucidlm.random_checkpoint import build_random_checkpoint

runner = CliRunner()
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = build_random_checkpoint(tmp_path_factory.mktemp("ckpt"))
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = CHATML
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_generate_json_gives_text_ids_and_logprobs(checkpoint):
    result = runner.invoke(app, ["generate", "-m", str(checkpoint), "--max-new-tokens", "8", "--json", "Hi", "Hello"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    expected = lucidlm.load(checkpoint).generate(["Hi", "Hello"], max_new_tokens=8)
    for record, c in zip(records, expected):
        assert record["token_ids"] == c.token_ids and record["text"] == c.text
        assert record["logprobs"] == pytest.approx(c.logprobs, abs=1e-5)
        assert record["finish_reason"] == "length"


def test_generate_streams_the_same_text(checkpoint):
    args = ["generate", "-m", str(checkpoint), "--max-new-tokens", "8", "--temperature", "0.7", "--seed", "3", "Hi"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    expected = lucidlm.load(checkpoint).generate("Hi", max_new_tokens=8, temperature=0.7, seed=3)[0].text
    assert result.stdout == expected + "\n"


def test_chat_keeps_history_and_resets(checkpoint):
    lm = lucidlm.load(checkpoint)
    first = lm.chat([{"role": "user", "content": "hi"}], max_new_tokens=5).text
    second = lm.chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": first},
                      {"role": "user", "content": "more"}], max_new_tokens=5).text
    result = runner.invoke(app, ["chat", "-m", str(checkpoint), "--max-new-tokens", "5"],
                           input="hi\nmore\n/reset\nhi\n/exit\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{first}\n{second}\n{first}\n"


@pytest.mark.parametrize("option,named", [
    (["--temperature", "-1"], "temperature"), (["--top-p", "0"], "top_p"), (["--top-k", "-2"], "top_k"),
    (["--max-new-tokens", "0"], "max_new_tokens"), (["--num-beams", "0"], "num_beams"),
])
def test_bad_options_exit_2_naming_the_option(checkpoint, option, named):
    cmd = [sys.executable, "-m", "lucidlm", "generate", "-m", str(checkpoint), *option, "Hi"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 2 and named in result.stderr, result.stderr


def test_unknown_option_is_rejected(checkpoint):
    result = runner.invoke(app, ["generate", "-m", str(checkpoint), "--top-q", "0.5", "Hi"])
    assert result.exit_code != 0 and "top-q" in result.output


def test_generate_with_packed_weights_gives_the_same_tokens(checkpoint):
    args = ["generate", "-m", str(checkpoint), "--max-new-tokens", "8", "--json", "--pack-weights", "Hi"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    expected = lucidlm.load(checkpoint).generate("Hi", max_new_tokens=8)[0]
    assert json.loads(result.stdout)["token_ids"] == expected.token_ids
