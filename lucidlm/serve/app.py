"""The HTTP side of ``lucidlm serve``: OpenAI's routes on FastAPI, fed by the continuous batcher.

    POST /v1/chat/completions, /v1/completions ─prepare.py (worker thread)─▶ prompt ids, GenerationConfig
        ─▶ Job: one Sequence per choice ─submit─▶ ContinuousBatcher (its own thread)
        ◀── TokenEvents (via the event loop) ── stream: one SSE chunk per token, then [DONE]
                                                 else: one JSON body when every choice has finished
    GET /v1/models, /v1/models/{id}, /health, / (the web page, static/)

Every bad input is answered with an OpenAI error object before anything is queued; a client that
goes away cancels its sequences, which leave the batch before the next decode step. The event loop does
no CPU work of its own: parsing, chat templates and tokenization run in worker threads (prepare.py), so
one request can never stall /health or another client's stream; a failure while decoding one sequence
fails that sequence alone (batcher.py).

The pieces, each readable alone:
    ServeConfig          the server's limits (the `lucidlm serve` command fills it)
    ServeState           what every route shares: batcher, preparer, token texts, worker threads, config;
                         routes receive it as a FastAPI dependency (``Served``)
    Job                  one request's sequences and the queue their events arrive on
    routes               list_models, get_model, health, page, chat_completions, completions
    generate             submit a prepared request, then answer it as a stream (stream_response, sse_chunks)
                         or as one JSON body (json_response, collect, best_choices)
    create_app           the FastAPI app: lifespan, error handlers, the router, static files
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import LM
from ..generate.events import Completion
from ..generate.generation_config import GenerationConfig
from ..generate.strategies import mean_logprob
from ..probe.selective import lowest_max_score
from .batcher import ContinuousBatcher, Draining, ErrorEvent, QueueFull, Sequence, TokenEvent
from .errors import OpenAIError
from .prepare import Prepared, Preparer, read_body
from .responses import ChoiceState, ResponseBuilder, TokenTexts

log = logging.getLogger("lucidlm.serve")
STATIC = Path(__file__).parent / "static"


@dataclass
class ServeConfig:
    model_name: str
    max_batch: int = 32  # sequences decoded together (KV-cache slots)
    max_queue: int = 256  # requests waiting for a slot before the server answers 429
    max_len: int | None = None  # context per sequence (default: the model's, capped at 4096)
    max_body_bytes: int = 4 << 20
    max_prompts: int = 64  # prompts in one /v1/completions request (400 beyond; the queue bound is for load)
    max_prompt_chars: int | None = None  # default: max_len x the longest token (a longer text cannot fit)
    body_timeout: float = 30.0  # seconds for a request body to arrive (408, connection closed)
    header_timeout: float = 10.0  # seconds for a request head to arrive (connection closed: slowloris)
    keep_alive_timeout: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int | None = None  # open connections before 503 (default: max_batch + max_queue + 64)
    max_header_bytes: int = 16 << 10  # a request head larger than this is refused (h11's incomplete event size)
    prepare_threads: int = 4  # worker threads that parse, render and tokenize requests


# --- the state every route shares -------------------------------------------------------------------------
@dataclass
class ServeState:
    """One server's model, limits and machinery; built by ``create_app``, started and stopped by its lifespan."""

    lm: LM
    config: ServeConfig
    max_len: int  # context per sequence
    batcher: ContinuousBatcher
    preparer: Preparer  # request body -> Prepared (runs in ``workers``)
    texts: TokenTexts  # each token id's own text, for logprobs and scores
    workers: ThreadPoolExecutor

    @classmethod
    def build(cls, lm: LM, config: ServeConfig) -> ServeState:
        max_len = config.max_len or min(lm.model.config.max_seq_len, 4096)
        batcher = ContinuousBatcher(lm, max_batch=config.max_batch, max_queue=config.max_queue, max_len=max_len)
        preparer = Preparer(lm, config.model_name, max_len, config.max_batch, config.max_prompts,
                            config.max_prompt_chars)
        workers = ThreadPoolExecutor(config.prepare_threads, thread_name_prefix="lucidlm-prepare")
        return cls(lm, config, max_len, batcher, preparer, TokenTexts(lm.tokenizer), workers)

    def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        """Refuse new work, end every running sequence ("abort"), then wait for the batcher's thread."""
        self.batcher.stop_accepting()
        self.batcher.abort_all()
        self.workers.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self.batcher.stop)

    def serving(self) -> bool:
        return self.batcher.accepting and self.batcher.thread.is_alive()

    def model_card(self) -> dict:
        probe = self.lm.probe
        return {"id": self.config.model_name, "object": "model", "created": 0, "owned_by": "lucidlm",
                "max_model_len": self.max_len, "probe": probe is not None,
                "probe_layer": probe.config.layer if probe is not None else None}

    async def prepare(self, request: Request, step: Callable[[bytes], Prepared]) -> Prepared:
        """The request's body, read within its byte and time limits, through ``step`` in a worker thread."""
        raw = await read_body(request, self.config.max_body_bytes, self.config.body_timeout)
        return await asyncio.get_running_loop().run_in_executor(self.workers, step, raw)  # CPU work: off the loop

    def response_builder(self, p: Prepared) -> ResponseBuilder:
        body = p.body
        want_logprobs = bool(body.logprobs) if p.chat else body.logprobs is not None
        return ResponseBuilder(p.chat, self.config.model_name, self.texts, want_logprobs, body.n_top_logprobs,
                               probe=self.lm.probe is not None)

    def submit(self, job: Job) -> None:
        """Queue the job's prompt groups at once, or answer 429 (queue full) / 503 (shutting down)."""
        try:
            self.batcher.submit_request(job.groups())
        except QueueFull as e:
            job.cancel()
            raise OpenAIError(429, f"the server is busy: {e}; retry later", code="queue_full") from None
        except Draining:
            job.cancel()
            raise OpenAIError(503, "the server is shutting down", code="shutting_down") from None


async def serve_state(request: Request) -> ServeState:  # async: FastAPI runs a plain def in a thread
    return request.app.state.serve


Served = Annotated[ServeState, Depends(serve_state)]


# --- one request's sequences --------------------------------------------------------------------------------
class Job:
    """One request's sequences and the queue their events arrive on (filled from the batcher thread)."""

    def __init__(self, prompts: list[list[int]], config: GenerationConfig, n: int, top_logprobs: int) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, TokenEvent | ErrorEvent]] = asyncio.Queue()
        self.per_prompt = n

        def sink(index: int):
            def deliver(event: TokenEvent | ErrorEvent) -> None:
                try:
                    loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
                except RuntimeError:  # the event loop has closed: no one is listening any more
                    return

            return deliver

        self.seqs = [Sequence(p, config, sink(i * n + j), top_logprobs=top_logprobs, sample_index=j)
                     for i, p in enumerate(prompts) for j in range(n)]
        self.choices = [ChoiceState() for _ in self.seqs]

    def groups(self) -> list[list[Sequence]]:
        """Each prompt's sequences, which start together (a group)."""
        return [self.seqs[i:i + self.per_prompt] for i in range(0, len(self.seqs), self.per_prompt)]

    async def events(self) -> AsyncIterator[tuple[int, TokenEvent | ErrorEvent]]:
        """Events in arrival order until every choice has finished (or one failed)."""
        open_ = len(self.seqs)
        while open_:
            index, event = await self.queue.get()
            yield index, event
            if isinstance(event, ErrorEvent):
                return
            if event.finish_reason is not None:
                open_ -= 1

    def record(self, index: int, event: TokenEvent) -> None:
        c = self.choices[index]
        c.events.append(event)
        c.text += event.text
        c.finish_reason = event.finish_reason

    def cancel(self) -> None:
        for s in self.seqs:
            s.cancel()


# --- routes -----------------------------------------------------------------------------------------------------
router = APIRouter()


@router.get("/v1/models")
async def list_models(state: Served) -> dict:
    return {"object": "list", "data": [state.model_card()]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, state: Served) -> dict:
    state.preparer.check_model(model_id)
    return state.model_card()


@router.get("/health")
async def health(state: Served) -> JSONResponse:
    status = "ok" if state.serving() else "draining"
    return JSONResponse({"status": status, "model": state.config.model_name, **state.batcher.stats()},
                        status_code=200 if status == "ok" else 503)


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html")


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, state: Served) -> Response:
    return await generate(request, state, await state.prepare(request, state.preparer.chat))


@router.post("/v1/completions")
async def completions(request: Request, state: Served) -> Response:
    return await generate(request, state, await state.prepare(request, state.preparer.completions))


# --- generation: submit, then a stream or one JSON body -----------------------------------------------------------
async def generate(request: Request, state: ServeState, p: Prepared) -> Response:
    body = p.body
    builder = state.response_builder(p)
    job = Job(p.prompts, p.config, body.generated_per_prompt, body.n_top_logprobs)
    state.submit(job)
    prompt_tokens = sum(len(ids) for ids in p.prompts)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return stream_response(job, builder, p.prefixes, prompt_tokens, include_usage)
    return await json_response(request, job, builder, p, prompt_tokens)


def stream_response(job: Job, builder: ResponseBuilder, prefixes: list[str], prompt_tokens: int,
                    include_usage: bool) -> StreamingResponse:
    return StreamingResponse(sse_chunks(job, builder, prefixes, prompt_tokens, include_usage),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def sse_chunks(job: Job, builder: ResponseBuilder, prefixes: list[str], prompt_tokens: int,
                     include_usage: bool) -> AsyncIterator[str]:
    """The stream: each choice's opening chunk, one chunk per token, each choice's finish, usage, [DONE]."""
    try:
        for index, prefix in enumerate(prefixes):
            if builder.chat:
                yield sse(builder.role_chunk(index))
            elif prefix:
                yield sse(builder.text_chunk(index, prefix))
        offsets = [len(p) for p in prefixes]
        async for index, event in job.events():
            if isinstance(event, ErrorEvent):
                yield sse(OpenAIError(500, event.message).body())
                break
            job.record(index, event)
            if event.token_id >= 0:
                yield sse(builder.token_chunk(index, event, offsets[index]))
                offsets[index] += len(event.text)
            if event.finish_reason is not None:
                yield sse(builder.finish_chunk(index, event.finish_reason))
        else:
            if include_usage:
                yield sse(builder.usage_chunk(prompt_tokens, job.choices))
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # the client disconnected (the generator is closed) or we are done: free the slots


async def json_response(request: Request, job: Job, builder: ResponseBuilder, p: Prepared,
                        prompt_tokens: int) -> JSONResponse:
    """One body once every choice has finished (with best_of: the n best of each prompt's samples)."""
    body = p.body
    await collect(request, job)
    choices = job.choices
    if body.generated_per_prompt > body.n:  # best_of: keep the n best of each prompt's samples
        choices = best_choices(choices, body.generated_per_prompt, body.n, body.best_of_scorer)
    return JSONResponse(builder.response(choices, prompt_tokens, p.prefixes, generated=job.choices))


async def collect(request: Request, job: Job) -> None:
    """Record every event of the job; a failed sequence is a 500, a client that leaves cancels the job."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    try:
        async for index, event in job.events():
            if isinstance(event, ErrorEvent):
                raise OpenAIError(500, event.message)
            job.record(index, event)
    finally:
        watcher.cancel()
        job.cancel()  # no-op when finished; frees the slots if this handler is torn down


def best_choices(choices: list[ChoiceState], per_prompt: int, n: int, scorer: str) -> list[ChoiceState]:
    """For each prompt's ``per_prompt`` samples, the ``n`` best in rank order (ties: the earlier sample)."""
    rank = lowest_max_score if scorer == "lowest_max_score" else mean_logprob  # the library's scorers

    def score(c: ChoiceState) -> float:
        events = [e for e in c.events if e.token_id >= 0]  # an "abort" event carries no token
        if not events:
            return float("-inf")
        return rank(Completion.from_events(events, with_text=False, with_scores=scorer == "lowest_max_score"))

    out = []
    for start in range(0, len(choices), per_prompt):
        group = choices[start:start + per_prompt]
        out += sorted(group, key=score, reverse=True)[:n]  # sorted is stable: ties keep sample order
    return out


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """A non-streamed request whose client leaves: cancel its sequences instead of finishing them."""
    while True:
        if await request.is_disconnected():
            job.cancel()
            job.queue.put_nowait((0, ErrorEvent("the client disconnected")))  # ends the collecting loop
            return
        await asyncio.sleep(0.1)


# --- the app ----------------------------------------------------------------------------------------------------
async def _openai_error(request: Request, e: OpenAIError) -> JSONResponse:
    return e.response()


async def _internal_error(request: Request, e: Exception) -> JSONResponse:  # a bug: still an OpenAI error
    return OpenAIError(500, f"internal error: {type(e).__name__}").response()


async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    message = f"{request.method} {request.url.path}: {e.detail}"
    return OpenAIError(e.status_code, message, code=str(e.status_code)).response()


def create_app(lm: LM, config: ServeConfig) -> FastAPI:
    state = ServeState.build(lm, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start()
        yield
        await state.stop()

    app = FastAPI(title="lucidlm", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.serve = state
    app.state.batcher = state.batcher  # server.py drains it on shutdown
    app.state.config = config
    app.add_exception_handler(OpenAIError, _openai_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
