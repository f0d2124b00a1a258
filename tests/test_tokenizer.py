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
