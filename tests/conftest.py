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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
