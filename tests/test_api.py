import pytest
import torch
from hf_models import save_hf_model

import lucidlm
from lucidlm.random_checkpoint import build_random_checkpoint


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return build_random_checkpoint(tmp_path_factory.mktemp("demo"))


def test_load_returns_model_tokenizer_config(demo_dir):
    lm = lucidlm.load(demo_dir, dtype="float32", device="cpu")
    assert isinstance(lm.model, lucidlm.Transformer)
    assert lm.config.n_layers == 4 and lm.tokenizer is not None
    ids = torch.tensor([lm.encode("hello"), lm.encode("world")])
    logits = lm.model(ids)
    assert logits.shape == (2, ids.shape[1], lm.config.vocab_size)
    assert lm.device.type == "cpu" and lm.dtype == torch.float32


def test_load_in_bfloat16(demo_dir):
    lm = lucidlm.load(demo_dir, dtype="bfloat16", device="cpu")
    assert lm.dtype == torch.bfloat16
    assert lm.model(torch.tensor([lm.encode("hi")])).dtype == torch.bfloat16


def test_save_round_trip_keeps_logits_and_tokenizer(demo_dir, tmp_path):
    lm = lucidlm.load(demo_dir, device="cpu")
    lm.save(tmp_path / "copy")
    again = lucidlm.load(tmp_path / "copy", device="cpu")
    ids = torch.tensor([lm.encode("round trip")])
    assert again.encode("round trip") == lm.encode("round trip")
    torch.testing.assert_close(again.model(ids), lm.model(ids), rtol=0, atol=0)


def test_checkpoint_without_tokenizer_explains_encode_failure(tmp_path):
    save_hf_model("llama", tmp_path)
    lm = lucidlm.load(tmp_path, device="cpu")
    assert lm.tokenizer is None
    with pytest.raises(ValueError, match="no tokenizer.json"):
        lm.encode("text")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on machines without CUDA")
def test_cuda_requested_without_cuda_is_a_clear_error(demo_dir):
    with pytest.raises(ValueError, match="CUDA is not available"):
        lucidlm.load(demo_dir, device="cuda")
