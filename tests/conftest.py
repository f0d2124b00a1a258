import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # lets tests import hf_models

torch.set_num_threads(min(2, torch.get_num_threads()))

# lucidlm.load compiles decode steps (once per shape) by default; tests ask for it where they test it, and a
# compiled step goes to a cache of the test session, never the user's ~/.cache
os.environ.setdefault("LUCIDLM_COMPILE", "off")
os.environ["LUCIDLM_CACHE_DIR"] = tempfile.mkdtemp(prefix="lucidlm-test-cache-")


@pytest.fixture()
def one_thread():
    """Tiny tensors on a shared 2-core machine: the thread pool's hand-offs cost more than the work (a forward of
    64-wide matrices 0.4 s instead of 1 ms when the other core is busy). Use: pytestmark = usefixtures."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
