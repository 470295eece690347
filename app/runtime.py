"""Everything one worker holds, built in one pass: pools, the pipeline's parts, telemetry."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flask import current_app

from app.web.auth import Guard
from app.canary import Canary
from app.config import Settings
from app.contacts import LidDirectory
from app.db import Database
from app.dedup import RecentIds
from app.instances import InstanceRepo
from app.pipeline import chores
from app.pipeline.admission import Admission
from app.pipeline.chores import Chore
from app.pipeline.flow import Flow
from app.pipeline.loop import LoopThread
from app.pipeline.message import owner_id
from app.web.ratelimit import WindowCounter
from app.telemetry.recorder import Recorder
from app.traces.store import TraceStore
from app.traces.writer import TraceWriter
from app.version import __version__

if TYPE_CHECKING:  # imported by create_app only when Loki is configured
    from app.telemetry.loki import LokiHandler

log = logging.getLogger("omni")


@dataclass
class Runtime:
    """One worker's state: what the routes and the pipeline use, and how to stop it."""

    settings: Settings
    recorder: Recorder
    db: Database
    instances: InstanceRepo
    traces: TraceStore
    writer: TraceWriter | None
    loop: LoopThread
    admission: Admission
    flow: Flow
    guard: Guard
    contacts: LidDirectory
    recent_ids: RecentIds
    webhook_rate_instance: WindowCounter
    webhook_rate_address: WindowCounter
    chores: list[Chore]
    loki: LokiHandler | None = None
    owner: str = field(default_factory=owner_id)
    version: str = __version__
    _stopped: bool = False

    def start(self) -> None:
        """Start the writer and loop threads and the chores (in the worker, after fork)."""
        if self.writer is not None:
            self.writer.start()
        self.loop.start()
        chores.schedule(self.loop, self.chores)

    def shutdown(self) -> None:
        """Drain in-flight messages, flush traces and logs, close connections (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        self.admission.close()
        interrupted = self.admission.drain(self.settings.shutdown_grace_s)
        if interrupted:
            # Their handlers record `error` and give back their slots.
            self.loop.cancel_tasks()
            self.admission.drain(5)
        self.loop.stop()
        if self.writer is not None:
            self.writer.stop(timeout=10)
        log.info("worker stopped", extra={"event": "worker_stopped", "interrupted": interrupted})
        if self.loki is not None:
            self.loki.close()
        self.db.close()


def build(settings: Settings, recorder: Recorder, loki: LokiHandler | None = None) -> Runtime:
    """Wire a worker's parts together (nothing runs until Runtime.start)."""
    db = Database(settings.database_url, size=settings.db_pool_size)
    store = TraceStore(db)
    writer = TraceWriter(db, store, recorder) if settings.enable_tracing else None
    loop = LoopThread()
    admission = Admission(settings.max_in_flight, recorder)
    guard = Guard(settings.api_key, settings.auth_failures_per_minute, recorder, db)
    every: list[Chore] = [Chore(60.0, guard.prune)]
    if settings.enable_tracing:
        every += [Chore(settings.sweep_interval_s, chores.sweeper(store, settings)),
                  Chore(settings.purge_interval_s, chores.purger(store, settings))]
    if settings.enable_metrics:
        every.append(Chore(5.0, recorder.sample_resources))
    instances = InstanceRepo(db)
    if settings.canary_instance:
        canary = Canary(settings, instances, store, recorder, owner_id())
        every.append(Chore(canary.poll_interval_s, canary.run_once))
    return Runtime(
        settings=settings, recorder=recorder, db=db, instances=instances, traces=store,
        writer=writer, loop=loop, admission=admission,
        flow=Flow(settings, loop, admission, writer, recorder), guard=guard,
        contacts=LidDirectory(db, on_error=lambda: recorder.upstream_failed("database", "write_failed")),
        recent_ids=RecentIds(),
        webhook_rate_instance=WindowCounter(settings.webhook_rate_per_instance or 1, 1.0),
        webhook_rate_address=WindowCounter(settings.webhook_rate_per_address or 1, 1.0),
        chores=every, loki=loki)


def runtime() -> Runtime:
    """The Runtime of the app handling the current request."""
    return current_app.extensions["omni"]
