"""A live lucidlm server on localhost for the serving tests: a tiny random model with a chat template and a
random probe head, served by uvicorn in a background thread on a free port."""

from __future__ import annotations

import torch
from tiny_lm import tiny_lm

from lucidlm.probe.probe import LoadedProbe, ProbeConfig, ProbeHead
from lucidlm.random_checkpoint import CHAT_TEMPLATE
from lucidlm.serve.app import ServeConfig
from lucidlm.serve.server import ServerThread, build_server

MODEL = "tiny"


def probed_tiny_lm():
    lm = tiny_lm()
    lm.tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    head = ProbeHead(lm.config.dim)
    with torch.no_grad():
        head.linear.weight.normal_(0, 0.05)
    lm.probe = LoadedProbe(head.eval(), ProbeConfig(layer=1, hidden_size=lm.config.dim, n_layers=lm.config.n_layers))
    return lm


def LiveServer(lm, **config) -> ServerThread:
    return ServerThread(build_server(lm, ServeConfig(model_name=MODEL, **config), port=0, log_level="warning",
                                     drain_timeout=5))
