"""Loading needs about one model's worth of memory, not two.

The loader builds the model on the meta device and reads tensors one at a time, so the process
never holds a randomly initialised model *and* a full state dict. We prove it by capping the
process's data memory (RLIMIT_DATA: heap and private mappings, which is where tensors live) at
1.5× the checkpoint size: lucidlm loads under the cap, the usual "build, then load_state_dict"
does not.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from waiting import HANG_GUARD

import lucidlm
from lucidlm.checkpoint import save_model

CAPPED = textwrap.dedent("""
    import os, resource, sys
    import torch
    import torch._dynamo  # imported lazily by load_state_dict; import it before measuring
    torch.set_num_threads(1)
    import lucidlm
    from lucidlm.checkpoint import load_model, read_hf_config
    from safetensors.torch import load_file

    def vmdata():
        for line in open("/proc/self/status"):
            if line.startswith("VmData"):
                return int(line.split()[1]) * 1024

    path, how, factor = sys.argv[1], sys.argv[2], float(sys.argv[3])
    size = os.path.getsize(os.path.join(path, "model.safetensors"))
    limit = vmdata() + int(factor * size)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    try:
        if how == "lucidlm":
            model = load_model(path).model
        else:
            _, _, cfg = read_hf_config(path)
            model = lucidlm.Transformer(cfg)
            model.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
        print("loaded", float(model.embed.weight.float().abs().sum()))
    except (MemoryError, RuntimeError) as e:
        print("out of memory:", str(e)[:80])
""")


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    cfg = lucidlm.from_preset("llama-125m", n_layers=6, dim=768, n_heads=8, n_kv_heads=8, ffn_dim=2048,
                              vocab_size=4000)  # ~ 190 MB in float32, no tensor over 7 MB
    with torch.device("meta"):
        model = lucidlm.Transformer(cfg)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    path = tmp_path_factory.mktemp("big")
    save_model(model, path)
    return path, float(model.embed.weight.detach().abs().sum())


def _load_capped(path, how: str, factor: float) -> str:
    env = {**os.environ, "MALLOC_ARENA_MAX": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CAPPED, str(path), how, str(factor)], env=env,
                          capture_output=True, text=True, timeout=HANG_GUARD)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def test_lazy_load_fits_where_eager_load_does_not(big_checkpoint):
    path, checksum = big_checkpoint
    lazy = _load_capped(path, "lucidlm", 1.5)
    assert lazy.startswith("loaded"), lazy
    assert float(lazy.split()[1]) == pytest.approx(checksum, rel=1e-5)  # the real weights arrived
    eager = _load_capped(path, "eager", 1.5)
    assert eager.startswith("out of memory"), eager  # the cap is tight enough to matter
