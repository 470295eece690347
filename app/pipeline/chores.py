"""A worker's periodic jobs: each an interval and a blocking function, run on the loop's
executor so a slow database never holds up messages."""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
from dataclasses import dataclass
from typing import Callable

from app.config import Settings
from app.pipeline.loop import LoopThread
from app.traces.store import TraceStore

log = logging.getLogger("omni.pipeline")


@dataclass(frozen=True)
class Chore:
    """Run `func` every `interval` seconds."""

    interval: float
    func: Callable[[], None]


def schedule(loop: LoopThread, chores: list[Chore]) -> None:
    """Start every chore on the loop."""
    for chore in chores:
        loop.spawn(_every(chore))


async def _every(chore: Chore) -> None:
    # Jitter so the workers of a replica do not all hit the database at once.
    await asyncio.sleep(random.uniform(0.2, 1.0) * min(chore.interval, 10))
    while True:
        try:
            await asyncio.get_running_loop().run_in_executor(None, chore.func)
        except Exception as exc:  # chores must never end the loop
            log.warning("periodic task failed", extra={"event": "periodic_failed", "error": str(exc)})
        await asyncio.sleep(chore.interval)


def sweeper(store: TraceStore, settings: Settings) -> Callable[[], None]:
    """Mark messages whose worker was lost as error."""
    def sweep() -> None:
        n = store.sweep_stale(settings.evolution_timeout_s + 60)
        if n:
            log.warning("marked abandoned messages as error", extra={"event": "traces_swept", "count": n})
    return sweep


def purger(store: TraceStore, settings: Settings) -> Callable[[], None]:
    """Delete traces past retention; one process at a time holds the purge lock."""
    def purge() -> None:
        cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=settings.trace_retention_days)
        n = store.delete_older_than(cutoff)
        if n:
            log.info("purged expired traces", extra={"event": "traces_purged", "count": n})
    return purge
