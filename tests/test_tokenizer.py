from lucidlm.tokenizer import Tokenizer, byte_tokenizer


def test_byte_tokenizer_round_trips_any_text():
    tok = byte_tokenizer()
    text = "Grüße, 世界! \n\t end"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    assert len(ids) == 1 + len(text.encode("utf-8"))  # one token per byte, plus BOS
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_saved_tokenizer_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    tok = byte_tokenizer()
    tok.save(tmp_path)
    reloaded = Tokenizer.from_dir(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for text in ["hello world", "naïve café", ""]:
        assert reloaded.encode(text) == hf(text)["input_ids"] == tok.encode(text)
    assert (reloaded.bos_token_id, reloaded.eos_token_id, reloaded.pad_token_id) == (
        hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)


def test_directory_without_tokenizer_gives_none(tmp_path):
    assert Tokenizer.from_dir(tmp_path) is None


def test_chat_template_read_from_separate_file(tmp_path):
    byte_tokenizer().save(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert Tokenizer.from_dir(tmp_path).chat_template == "{{ messages[0]['content'] }}"


# --- hostile or broken tokenizer files: a CheckpointError naming the file ----------------------------------

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from lucidlm.checkpoint import CheckpointError  # noqa: E402


@pytest.fixture
def saved(tmp_path) -> Path:
    byte_tokenizer().save(tmp_path / "tok")
    return tmp_path / "tok"


@pytest.mark.parametrize("text, words", [
    ('["<s>", "</s>"]', "expected a JSON object, got array"),
    ('{"bos_token": ', "invalid JSON"),
    (b"\xff\xfe{}", "invalid JSON"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"a": ' * 1000 + "1" + "}" * 1000, "nested too deeply"),
    ('{"eos_token": "\\ud800"}', "lone surrogate"),
    ('{"eos_token": ["</s>"]}', "eos_token must be a token string"),
    ('{"chat_template": 7}', "chat_template must be a string"),
], ids=["array", "truncated", "not utf-8", "100k arrays", "1000 objects", "surrogate", "list token", "int template"])
def test_bad_tokenizer_config_is_named(saved, text, words):
    path = saved / "tokenizer_config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(CheckpointError, match=words) as info:
        Tokenizer.from_dir(saved)
    assert str(path) in str(info.value)


def test_bad_tokenizer_json_is_named(saved):
    (saved / "tokenizer.json").write_text('{"model": 1}')
    with pytest.raises(CheckpointError, match="cannot read tokenizer") as info:
        Tokenizer.from_dir(saved)
    assert str(saved / "tokenizer.json") in str(info.value)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"])
def test_files_linked_out_of_the_directory_are_never_read(saved, tmp_path, name):
    secret = tmp_path / "secret.txt"
    secret.write_text("{}" if name != "tokenizer.json" else (saved / name).read_text())
    (saved / name).unlink(missing_ok=True)
    (saved / name).symlink_to(secret)
    with pytest.raises(CheckpointError, match="outside the checkpoint directory") as info:
        Tokenizer.from_dir(saved)
    assert str(saved / name) in str(info.value)


def test_links_inside_the_directory_are_followed(saved):
    (saved / "templates").mkdir()
    (saved / "templates" / "chat.jinja").write_text("{{ messages[0]['content'] }}")
    (saved / "chat_template.jinja").symlink_to("templates/chat.jinja")
    assert Tokenizer.from_dir(saved).apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"


def test_max_token_id_counts_added_tokens():
    tok = byte_tokenizer(("<|bos|>", "<|eos|>", "<|pad|>", "<|extra|>"))
    assert tok.max_token_id() == 259 == tok.backend.token_to_id("<|extra|>")
