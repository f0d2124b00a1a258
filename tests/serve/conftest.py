"""Fixtures of the serving tests: the probed tiny model and a live server on it (live_server.py)."""

from __future__ import annotations

import pytest
from live_server import LiveServer, probed_tiny_lm


@pytest.fixture(scope="module")
def lm():
    return probed_tiny_lm()


@pytest.fixture(scope="module")
def live(lm):
    server = LiveServer(lm, max_batch=32, max_queue=64, max_len=256)
    yield server
    server.close()
