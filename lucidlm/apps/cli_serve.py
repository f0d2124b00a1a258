"""``lucidlm serve``: an OpenAI-compatible HTTP server with per-token hallucination scores and a web page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .cli_generate import Compile, Device, Dtype, Model, PackWeights, Quantize


def serve_command(
    model: Model,
    probe: Annotated[Path | None, typer.Option(help="probe directory: every token gets a hallucination score "
                                                    "(the token_scores field, colours on the web page)")] = None,
    adapter: Annotated[Path | None, typer.Option(help="PEFT LoRA adapter directory to apply")] = None,
    host: Annotated[str, typer.Option(help="interface to listen on (0.0.0.0: every interface)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (0: any free port)")] = 8000,
    served_model_name: Annotated[str | None, typer.Option(help="the model id clients send (default: the "
                                                                "directory's name)")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="sequences decoded together (KV-cache slots)")] = 32,
    max_queue: Annotated[int, typer.Option(min=0, help="requests waiting for a slot before 429")] = 256,
    max_model_len: Annotated[int | None, typer.Option(min=2, help="context per sequence (default: the model's, "
                                                                  "at most 4096)")] = None,
    drain_timeout: Annotated[float, typer.Option(min=0, help="on shutdown, seconds streams in flight get to "
                                                             "finish before they are ended")] = 30.0,
    max_prompts: Annotated[int, typer.Option(min=1, help="prompts in one /v1/completions request (400 "
                                                         "beyond)")] = 64,
    max_connections: Annotated[int | None, typer.Option(min=1, help="open connections before 503 (default: "
                                                                    "max-batch + max-queue + 64)")] = None,
    header_timeout: Annotated[float, typer.Option(min=0.1, help="seconds a request's head may take to arrive "
                                                                "before the connection is closed")] = 10.0,
    body_timeout: Annotated[float, typer.Option(min=0.1, help="seconds a request's body may take to arrive "
                                                              "(408)")] = 30.0,
    device: Device = "auto",
    dtype: Dtype = "float32",
    pack_weights: PackWeights = False,
    quantize: Quantize = None,
    compile: Compile = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """Serve a checkpoint over HTTP with the OpenAI API (/v1/models, /v1/completions, /v1/chat/completions,
    streaming included), continuous batching, /health, and a chat page at / that colours every token by
    its hallucination score."""
    from ..api import load
    from ..serve.app import ServeConfig
    from ..serve.server import build_server

    lm = load(model, dtype=dtype, device=device, adapter=adapter, probe=probe, pack_weights=pack_weights,
              compile=compile, quantize=quantize)
    config = ServeConfig(model_name=served_model_name or Path(model).resolve().name, max_batch=max_batch,
                         max_queue=max_queue, max_len=max_model_len, max_prompts=max_prompts,
                         max_connections=max_connections, header_timeout=header_timeout, body_timeout=body_timeout)
    server = build_server(lm, config, host, port, drain_timeout, log_level)
    batcher = server.config.app.state.batcher
    typer.echo(f"serving {config.model_name}: {lm.model.num_parameters() / 1e6:.1f}M params, {lm.dtype}, "
               f"{lm.device}, probe {'on' if lm.probe else 'off'}; {batcher.max_batch} slots of {batcher.max_len} "
               f"tokens (KV cache {batcher.engine.cache.nbytes() / 2**20:.0f} MiB)", err=True)
    server.run()
