"""The compiled decode step, built ahead of use and kept on disk, so that the default path is the fast one without a
user waiting for a compiler.

Why compile at all. A decode step multiplies every weight by one vector per row. Eagerly, BLAS's matrix-vector
products stream the weights at about half the machine's read bandwidth and each of the step's ~300 small ops pays
Python's dispatch; one ``torch.compile``'d graph (inductor) streams them near the bandwidth and has no per-op
overhead: about 2x the tokens per second at batch 1 on CPU (``lucidlm bench``).

Why not plain ``torch.compile``. It compiles on the first call, for seconds to minutes, again in every new
process. Here each step *shape* (the engine's cache geometry, the rows of the step and the
cells it attends over) is compiled once per machine with ``torch.compile(...).aot_compile`` (whole graph, guards
included), saved under ``~/.cache/lucidlm/compiled/`` (``LUCIDLM_CACHE_DIR``), and loaded from there by later
processes in about a second. The parameters are inputs of the graph, never constants baked into it: the artefact
holds no copy of the weights, serves any model of the same architecture, and always reads the weights as they are
now (training, ``load_state_dict``).

Modes (``load(..., compile=)``): "on" (the default on CPU) builds a shape before its first step, in the caller's
thread: loaded from disk in about a second, or, once per machine, compiled (tens of seconds; logged); "off" never
compiles. ``LUCIDLM_COMPILE`` overrides the default. (Compiling in a background thread while steps run eagerly was
tried and dropped: torch's tracer patches ``nn.Module.__call__`` process-wide while it runs, which breaks an eager
forward in another thread.)

The artefact's key covers everything the graph depends on: torch, Python, the CPU's instruction set, the model's
config, dtype and device, the engine's cache geometry, the step shape and the source of lucidlm's model code.
A step whose guards still refuse it at run time (``CompiledStepRefused``), or that cannot be compiled as one graph,
runs eagerly from then on, with one warning in the log.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch._inductor.config as inductor_config

from .. import model as model_package
from ..atomic_io import atomic_write
from ..model.kv_cache import KVCache
from ..model.transformer import ModelOutput, Transformer

log = logging.getLogger("lucidlm.compiled_steps")

MODES = ("on", "off")


def default_mode() -> str:
    """The mode ``load`` uses on CPU unless told: ``LUCIDLM_COMPILE`` (on | off), else "on"."""
    mode = os.environ.get("LUCIDLM_COMPILE", "on")
    if mode not in MODES:
        raise ValueError(f"LUCIDLM_COMPILE={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def as_mode(compile: bool | str) -> str:
    """True -> "on", False -> "off", or one of MODES."""
    if isinstance(compile, bool):
        return "on" if compile else "off"
    if compile not in MODES:
        raise ValueError(f"compile={compile!r}: expected one of {', '.join(MODES)} (or True / False)")
    return compile


def cache_dir() -> Path:
    root = os.environ.get("LUCIDLM_CACHE_DIR") or Path.home() / ".cache" / "lucidlm"
    return Path(root) / "compiled"


@dataclass(frozen=True)
class StepShape:
    """What a compiled decode step is specialised to: the engine's cache and the step's own shape."""

    slots: int  # cache slots (the engine's max_batch)
    max_len: int  # cells per slot
    chunk: int  # the cache's chunk_size (sliding-window rings are sized by it)
    width: int  # rows of the step (a power of two, filled up with idle slots)
    kv_len: int  # cells attended (a multiple of the static bucket)
    layers: tuple[int, ...]  # hidden states returned (the probe's layer)


class CompiledStepRefused(RuntimeError):
    """A loaded step's guards refuse this call (something the key does not capture changed)."""


class CompiledSteps:
    """The compiled decode steps of one model, shape by shape (one per model: ``for_model``)."""

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.ready: dict[StepShape, Callable[..., ModelOutput]] = {}
        self.failed: set[StepShape] = set()
        self.compiled = 0  # shapes compiled in this process
        self.loaded = 0  # shapes loaded from disk
        self.seconds = 0.0  # spent building them

    @staticmethod
    def for_model(model: Transformer) -> CompiledSteps:
        steps = model.__dict__.get("_compiled_steps")
        if steps is None:
            steps = model.__dict__["_compiled_steps"] = CompiledSteps(model)
        return steps

    def get(self, shape: StepShape) -> Callable[..., ModelOutput] | None:
        """The step for ``shape``, built on first use; None if it cannot be built (then the step runs eagerly)."""
        if shape not in self.ready and shape not in self.failed:
            start = time.perf_counter()
            try:
                self.ready[shape] = self._build(shape)
            except Exception as e:  # noqa: BLE001 - a step that cannot be compiled runs eagerly, the engine goes on
                log.warning("decode step %s could not be compiled (%s: %s); it runs eagerly", shape,
                            type(e).__name__, e)
                self.failed.add(shape)
            self.seconds += time.perf_counter() - start
        return self.ready.get(shape)

    def preload(self, shapes: list[StepShape]) -> int:
        """Load the shapes among ``shapes`` that are on disk already (never compiles); how many were loaded.

        A server calls this before it serves, so that no request waits on a load (about half a second each)."""
        before = self.loaded
        for shape in shapes:
            if shape not in self.ready and shape not in self.failed and artifact_path(self.model, shape).exists():
                self.get(shape)
        return self.loaded - before

    def refuse(self, shape: StepShape, error: Exception) -> None:
        """A ready step failed at run time: run that shape eagerly from now on, and drop its artefact from disk."""
        log.warning("compiled decode step %s refused (%s); running it eagerly", shape, error)
        self.ready.pop(shape, None)
        self.failed.add(shape)
        artifact_path(self.model, shape).unlink(missing_ok=True)

    def _build(self, shape: StepShape) -> Callable[..., ModelOutput]:
        path = artifact_path(self.model, shape)
        fn = _load(path, self.model) if path.exists() else None
        if fn is not None:
            self.loaded += 1
        else:
            log.warning("lucidlm: compiling the decode step for %d row(s) over %d cells (once per machine and shape; "
                        "later runs load it from %s; LUCIDLM_COMPILE=off to skip)", shape.width, shape.kv_len,
                        cache_dir())
            fn = _compile(self.model, shape)
            _save(fn, path, self.model)
            self.compiled += 1
        model = self.model

        def step(tokens: torch.Tensor, plan, cache: KVCache) -> ModelOutput:
            try:
                return fn(model, tokens, plan, cache, hidden_layers=shape.layers, last_only=True)
            except RuntimeError as e:
                if "GuardManager check failed" in str(e):
                    raise CompiledStepRefused(str(e)) from e
                raise
        return step


def _example(model: Transformer, shape: StepShape) -> tuple[torch.Tensor, object, KVCache]:
    """A step of ``shape`` on a scratch cache laid out like the engine's (its cells are never touched but for the
    ones the step reads and writes, so the scratch costs little memory)."""
    param = next(model.parameters())
    with torch.inference_mode(False):  # as the engine's cache, built outside its steps (guards see the difference)
        cache = KVCache(model.config, shape.slots, shape.max_len, param.dtype, param.device, chunk_size=shape.chunk,
                        static=True, lazy=True)
    slots = list(range(shape.width))
    for s in slots:
        cache.lengths[s] = shape.kv_len - 1  # the step attends over kv_len cells
    with torch.inference_mode():  # as the engine's step: its tokens and plan are inference tensors
        plan = cache.begin(slots, 1)
        tokens = torch.zeros(shape.width, device=param.device, dtype=torch.long)[:, None]
    return tokens, plan, cache


def _compile(model: Transformer, shape: StepShape):
    tokens, plan, cache = _example(model, shape)
    compiled = torch.compile(model.forward_planned, dynamic=False, fullgraph=True)
    # no size asserts: the graph's guards already check every input's sizes and strides, and the generated wrapper
    # would check ~760 inputs again in Python on every step (2 ms of a 20 ms SmolLM2 step, measured)
    # MoE routing picks each expert's tokens with torch.where: a size known only at run time, which the graph
    # carries as an unbacked symbol instead of refusing to trace
    with torch.inference_mode(), inductor_config.patch(size_asserts=False), \
            torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        return compiled.aot_compile(((tokens, plan, cache), dict(hidden_layers=shape.layers, last_only=True)))


def _save(fn, path: Path, model: Transformer) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_write(path) as tmp:
            fn.save_compiled_function(str(tmp), external_data={"model": model})
    except Exception as e:  # noqa: BLE001 - an unwritable cache costs the next process a compile, nothing else
        log.warning("could not save the compiled step to %s (%s)", path, e)


def _load(path: Path, model: Transformer):
    """A step saved by ``_save`` (our own cache directory, written atomically; the format is torch's pickle of the
    compiled graph, so the directory is as trusted as inductor's own cache)."""
    from ..model import transformer

    try:
        with open(path, "rb") as f:
            data = io.BytesIO(f.read())
        # in inference mode, as the steps run: the guards' dispatch-key checks take the thread's mode at load time
        # (loaded outside it, every step's inference tensors would fail them)
        with torch.inference_mode():
            return torch.compiler.load_compiled_function(data, f_globals=transformer.__dict__,
                                                         external_data={"model": model})
    except Exception as e:  # noqa: BLE001 - a stale or foreign artefact is rebuilt, not fatal
        log.warning("compiled step %s could not be loaded (%s); compiling it again", path, e)
        return None


def artifact_path(model: Transformer, shape: StepShape) -> Path:
    return cache_dir() / f"{artifact_key(model, shape)}.bin"


def artifact_key(model: Transformer, shape: StepShape) -> str:
    param = next(model.parameters())
    parts = [torch.__version__, sys.version, platform.machine(), torch.backends.cpu.get_cpu_capability(),
             repr(model.config), str(param.dtype), param.device.type, repr(shape), _model_source_hash(),
             repr(model)]  # every module and its settings: LoRA, adapters or quantized layers change the graph
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


@functools.cache
def _model_source_hash() -> str:
    """The compiled graph is lucidlm's model code: a change to it must not reuse an old artefact."""
    digest = hashlib.sha256()
    for f in [*sorted(Path(model_package.__file__).parent.glob("*.py")), Path(__file__)]:  # + how it is traced
        digest.update(f.read_bytes())
    return digest.hexdigest()
