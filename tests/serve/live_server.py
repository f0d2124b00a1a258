"""A live lucidlm server on localhost for the serving tests: a tiny random model with a chat template and a
random probe head ("own" alignment unless asked), served by uvicorn in a background thread on a free port."""

from __future__ import annotations

from tiny_lm import random_probe, tiny_lm
from waiting import HANG_GUARD

from lucidlm.random_checkpoint import CHAT_TEMPLATE
from lucidlm.serve.app import ServeConfig
from lucidlm.serve.server import ServerThread, build_server

MODEL = "tiny"


def probed_tiny_lm(alignment: str = "own"):
    lm = tiny_lm()
    lm.tokenizer.chat_template = CHAT_TEMPLATE
    lm.probe = random_probe(lm, layer=1, alignment=alignment)
    return lm


def LiveServer(lm, **config) -> ServerThread:
    """Started and listening when it returns (however long a loaded machine takes to start it)."""
    return ServerThread(build_server(lm, ServeConfig(model_name=MODEL, **config), port=0, log_level="warning",
                                     drain_timeout=5), timeout=HANG_GUARD)
