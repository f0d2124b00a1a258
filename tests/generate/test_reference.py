import pytest
import torch
from hf_models import save_hf_model

from lucidlm.checkpoint import load_model
from lucidlm.generate.reference import greedy_no_cache


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_greedy_matches_transformers_generate(kind, tmp_path):
    hf = save_hf_model(kind, tmp_path)
    ours = load_model(tmp_path).model
    prompt = [5, 17, 42, 7]
    new = greedy_no_cache(ours, prompt, max_new_tokens=10)
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, min_new_tokens=10,
                      pad_token_id=0)[0, len(prompt):].tolist()
    assert new == ref


def test_rejects_empty_prompt_and_bad_length(tmp_path):
    save_hf_model("llama", tmp_path)
    model = load_model(tmp_path).model
    with pytest.raises(ValueError, match="empty"):
        greedy_no_cache(model, [], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_no_cache(model, [1], 0)
