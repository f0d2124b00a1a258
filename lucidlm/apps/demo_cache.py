"""The demos' stage cache: ``out/<stage>/`` reused while its settings (and every earlier stage's) hold.

Each stage has a fingerprint chaining its own settings onto the previous stage's, written to
``out/<stage>.done`` only once the stage is complete — so a changed setting rebuilds that stage and
every later one, and a stage interrupted half-way is never taken as done.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..atomic_io import write_text


def stage_keys(settings: dict[str, list]) -> dict[str, str]:
    """{stage: fingerprint} for stages in order, each covering its settings and every earlier stage's."""
    keys, chain = {}, ""
    for stage, values in settings.items():
        chain = hashlib.sha256((chain + json.dumps(values)).encode()).hexdigest()[:16]
        keys[stage] = chain
    return keys


class Cache:
    def __init__(self, out: Path, keys: dict[str, str]) -> None:
        self.out, self.keys = out, keys

    def fresh(self, stage: str) -> bool:
        marker = self.out / f"{stage}.done"
        return marker.exists() and marker.read_text() == self.keys[stage]

    def start(self, stage: str) -> Path:
        """An empty directory for the stage (a stale or half-built one is removed first)."""
        (self.out / f"{stage}.done").unlink(missing_ok=True)
        path = self.out / stage
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    def finish(self, stage: str) -> None:
        write_text(self.out / f"{stage}.done", self.keys[stage])


T = TypeVar("T")


def timed_stage(cache: Cache, stage: str, work: Callable[[], T], console, timings: dict[str, float]) -> T:
    """Run (or reuse) a stage, record its seconds, print a ✓ line saying which."""
    began, cached = time.perf_counter(), cache.fresh(stage)
    result = work()
    timings[stage] = time.perf_counter() - began
    console.print(f"[green]✓[/green] {stage:<9} {'cached' if cached else f'{timings[stage]:.0f}s'}")
    return result


def risk_color(score: float) -> str:
    """Green (safe) through yellow to red (likely hallucinated)."""
    s = min(max(score, 0.0), 1.0)
    red, green = (int(255 * min(1, 2 * s)), int(255 * min(1, 2 * (1 - s))))
    return f"rgb({red},{green},60)"
