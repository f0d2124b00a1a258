"""``lucidlm serve``: load the model, build the app, run uvicorn with a graceful shutdown.

On SIGINT/SIGTERM the server stops listening and answers new requests on open connections with 503;
streams in flight keep decoding for up to ``drain_timeout`` seconds, and those still running then are
ended cleanly (a last chunk with ``finish_reason: "abort"`` and ``[DONE]``), never cut mid-chunk.

Connections are bounded so that slow or idle clients cannot hold the process's file descriptors: a request
head must arrive within ``header_timeout`` (uvicorn has no such limit: see ``_H11HeadTimeout``) and be at most
``max_header_bytes``, its body within ``body_timeout`` (app.py), an idle keep-alive connection closes after
``keep_alive_timeout``, and beyond ``max_connections`` open connections requests are answered 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..api import LM
from .app import ServeConfig, create_app

log = logging.getLogger("lucidlm.serve")


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain_timeout: float) -> None:
        super().__init__(config)
        self.drain_timeout = drain_timeout

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        batcher = self.config.app.state.batcher
        batcher.stop_accepting()
        deadline = asyncio.get_running_loop().call_later(self.drain_timeout, batcher.abort_all)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn re-raises the signal that stopped it once it has shut down (exit status 130/143); after
        # a drained shutdown the process has done what was asked, so it exits 0 like other servers
        with super().capture_signals():
            yield
            self._captured_signals.clear()


class _H11HeadTimeout(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head (request line and headers) is not complete
    ``head_timeout`` s after the connection opened or its previous response ended — or whose body is still
    arriving then, though it was answered without being read (a 404). uvicorn only times out a connection idle
    between requests, and any byte received cancels that timer: a client trickling a byte at a time
    (slowloris) would hold its connection forever. A body being read is the app's to time out (408)."""

    head_timeout = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        no_head = self.conn.their_state is h11.IDLE
        unread_body = self.conn.their_state is h11.SEND_BODY and self.cycle is not None and self.cycle.response_complete
        if (no_head or unread_body) and not self.transport.is_closing():
            self.transport.close()


def build_server(lm: LM, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000,
                 drain_timeout: float = 30.0, log_level: str = "info") -> GracefulServer:
    app = create_app(lm, config)
    protocol = type("H11HeadTimeout", (_H11HeadTimeout,), {"head_timeout": config.header_timeout})
    connections = config.max_connections or config.max_batch + config.max_queue + 64
    uv = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", http=protocol,
                        timeout_keep_alive=config.keep_alive_timeout, limit_concurrency=connections,
                        h11_max_incomplete_event_size=config.max_header_bytes,
                        timeout_graceful_shutdown=drain_timeout + 10)  # after the abort: a backstop
    return GracefulServer(uv, drain_timeout)


def bound_port(server: uvicorn.Server) -> int:
    """The port a started server listens on (useful with port=0)."""
    return server.servers[0].sockets[0].getsockname()[1]


class ServerThread:
    """A server running in a background thread of this process (tests, benchmarks, notebooks)."""

    def __init__(self, server: GracefulServer, timeout: float = 30.0) -> None:
        self.server = server
        self.thread = threading.Thread(target=server.run, name="lucidlm-server", daemon=True)
        self.thread.start()
        deadline = time.time() + timeout
        while not server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        self.url = f"http://{server.config.host}:{bound_port(server)}"
        self.batcher = server.config.app.state.batcher

    def close(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (for starting a server process on it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str, process=None, timeout: float = 120.0) -> None:
    """Poll ``url``/health until the server answers 200; fail early if ``process`` (a Popen) has exited."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:  # not listening yet, or too busy to answer within 5 s: ask again
            pass
        if time.monotonic() > deadline:  # also when it answers, but never 200
            raise RuntimeError(f"no server answered 200 at {url}/health within {timeout:.0f} s")
        time.sleep(0.2)
