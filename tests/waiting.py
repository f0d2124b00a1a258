"""Waiting in tests without depending on the machine's speed.

A test waits for an event (a file written, a server up, a row cancelled), never for an amount of time, and never
asserts on how long something took. A deadline only guards against a hang: it is ``HANG_GUARD`` seconds, far beyond
what any wait takes even on a loaded machine (a CI run sharing its machine with another heavy job took more than twice
as long; on two cores shared with other CPU-bound jobs, a cold ``lucidlm`` command took 55 s to start and exit), so
reaching it means the awaited event will not happen, not that the machine is slow.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable

HANG_GUARD = 600.0  # seconds: the deadline of every wait and subprocess in the suite; a guard, not a measurement


def wait_for(condition: Callable[[], object], what: str, *, timeout: float = HANG_GUARD, interval: float = 0.02,
             process: subprocess.Popen | None = None) -> None:
    """Poll ``condition`` until it is true. Fails naming ``what`` if ``process`` (a Popen) exits first, or after
    ``timeout`` seconds (a hang guard)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            out = process.stderr.read()[-2000:] if process.stderr else ""
            raise AssertionError(f"the process exited with status {process.returncode} before {what}\n{out}")
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:.0f} s for {what}: it did not happen")
        time.sleep(interval)


async def async_wait_for(condition: Callable[[], object], what: str, *, timeout: float = HANG_GUARD,
                         interval: float = 0.01) -> None:
    """``wait_for`` inside an event loop: sleeps with ``asyncio.sleep`` so the loop's other tasks run meanwhile."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:.0f} s for {what}: it did not happen")
        await asyncio.sleep(interval)
