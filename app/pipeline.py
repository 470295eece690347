"""Background processing of accepted messages: agent call, Evolution send, final trace.

Each gunicorn worker runs one asyncio loop in a thread; every accepted message is a task
on it, so hundreds of slow agent calls cost sockets, not threads, and the webhook answers
as soon as the trace row is committed.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from decimal import Decimal

import aiohttp

from app.config import Settings
from app.instances import Instance
from app.telemetry import metrics
from app.traces.store import FinishedTrace
from app.upstream import UpstreamError, call_agent, send_evolution_retrying

log = logging.getLogger("omni.pipeline")

STEPS = ("webhook_received", "instance_validated", "agent_called", "evolution_send")


def utcnow() -> dt.datetime:
    """Timezone-aware now in UTC."""
    return dt.datetime.now(dt.timezone.utc)


def iso(ts: dt.datetime) -> str:
    """RFC 3339 UTC with milliseconds and a Z."""
    return ts.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def owner_id(pid: int | None = None) -> str:
    """host:pid of a worker, stored on the rows it processes so recovery can find them."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


@dataclass
class Message:
    """An accepted message on its way through the pipeline."""

    trace_id: uuid.UUID
    instance: Instance
    user_id: str
    digits: str             # of the agent's session_name: the phone, else the LID
    text: str
    received_at: dt.datetime
    started: float
    reply_number: str = ""  # sendText `number`: phone digits or a LID JID
    steps: list[dict] = field(default_factory=list)
    current_step: str = "agent_called"
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost_usd: Decimal | None = None
    agent_session_id: str | None = None
    # A canary's message (app/canary.py): traced and logged, counted only in the canary metrics.
    synthetic: bool = False


class Pipeline:
    """Owns the worker's event loop, the in-flight bound and the processing coroutine."""

    def __init__(self, settings: Settings, writer, on_periodic=None) -> None:
        self.settings = settings
        self.writer = writer  # TraceWriter, or None when tracing is off
        self.on_periodic = on_periodic or []
        self.metrics_on = settings.enable_metrics
        self.accepting = True
        self._in_flight = 0
        self._lock = threading.Lock()
        self._slot_freed = threading.Condition(self._lock)
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.owner = owner_id()

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the loop thread (in the worker process, after fork)."""
        self._thread = threading.Thread(target=self._run_loop, name="omni-pipeline", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run_loop(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        loop.run_until_complete(self._open_session())
        for interval, func in self.on_periodic:
            loop.create_task(self._every(interval, func))
        self._ready.set()
        loop.run_forever()
        # Periodic chores and anything left: cancel and let them unwind before closing.
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(self._session.close())
        loop.close()

    async def _open_session(self) -> None:
        # No per-host cap: the in-flight bound already limits concurrency.
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=60, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(connector=connector, raise_for_status=False,
                                              timeout=aiohttp.ClientTimeout(total=None, connect=10))

    async def _every(self, interval: float, func) -> None:
        # Jitter so the workers of a replica do not all hit the database at once.
        await asyncio.sleep(random.uniform(0.2, 1.0) * min(interval, 10))
        while True:
            try:
                await asyncio.get_running_loop().run_in_executor(None, func)
            except Exception as exc:  # periodic chores must never end the loop
                log.warning("periodic task failed", extra={"event": "periodic_failed", "error": str(exc)})
            await asyncio.sleep(interval)

    @property
    def in_flight(self) -> int:
        """Accepted messages not yet finished in this worker."""
        return self._in_flight

    def try_reserve(self, wait: float = 0.0) -> bool:
        """Claim an in-flight slot, waiting up to `wait` s for one when the worker is full;
        False when none came free or the worker is shutting down.

        The short wait is backpressure: a burst (or a sender that keeps N requests open) is
        slowed to the rate messages finish instead of being answered 503 over and over, which
        cost CPU the full worker needed for the messages it already had.
        """
        deadline = time.monotonic() + wait
        with self._slot_freed:
            while self.accepting and self._in_flight >= self.settings.max_in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._slot_freed.wait(remaining)
            if not self.accepting:
                return False
            self._in_flight += 1
        if self.metrics_on:
            metrics.IN_FLIGHT.inc()
        return True

    def release(self) -> None:
        """Give back a slot claimed by try_reserve."""
        with self._slot_freed:
            self._in_flight -= 1
            self._slot_freed.notify()
        if self.metrics_on:
            metrics.IN_FLIGHT.dec()

    def submit(self, msg: Message) -> None:
        """Hand an accepted message (slot already reserved) to the loop."""
        self._loop.call_soon_threadsafe(self._spawn, msg)

    def _spawn(self, msg: Message) -> None:
        task = self._loop.create_task(self._process(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def shutdown(self, grace: float) -> int:
        """Stop accepting, let in-flight messages finish within grace, interrupt the rest."""
        with self._slot_freed:
            self.accepting = False
            self._slot_freed.notify_all()  # webhooks waiting for a slot answer 503 now
        deadline = time.monotonic() + grace
        while self._in_flight > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        interrupted = self._in_flight
        if self._loop is not None and self._loop.is_running():
            if interrupted:
                self._loop.call_soon_threadsafe(self._cancel_all)
                end = time.monotonic() + 5
                while self._in_flight > 0 and time.monotonic() < end:
                    time.sleep(0.02)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        return interrupted

    def _cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    # --- processing ----------------------------------------------------------------------

    def record_step(self, msg: Message, step: str, status: str, seconds: float | None,
                    error: str | None = None, *, emit: bool = True, **extra) -> None:
        """Append a step to the message; observe and log it now (emit) or via emit_steps later."""
        entry = {"step": step, "status": status,
                 "duration_ms": None if seconds is None else int(round(seconds * 1000)),
                 "timestamp": iso(utcnow())}
        if error:
            entry["error"] = error
        entry.update(extra)
        msg.steps.append(entry)
        if emit:
            self._emit_step(msg, entry, seconds)

    def emit_steps(self, msg: Message, timings: dict[str, float]) -> None:
        """Observe and log steps recorded with emit=False (once the message is accepted)."""
        for entry in msg.steps:
            if entry["step"] in timings:
                self._emit_step(msg, entry, timings[entry["step"]])

    def _emit_step(self, msg: Message, entry: dict, seconds: float | None) -> None:
        step, status = entry["step"], entry["status"]
        if seconds is not None and self.metrics_on and not msg.synthetic:
            metrics.child(metrics.STEP_DURATION, msg.instance.name, step, status).observe(seconds)
        if self.settings.enable_detailed_logging and status != "skipped":
            log.log(logging.WARNING if status == "failed" else logging.INFO,
                    "step %s %s", step, status,
                    extra={"event": "step_completed" if status == "success" else "step_failed",
                           "trace_id": str(msg.trace_id), "instance": msg.instance.name,
                           "user_id": msg.user_id, "step": step, "status": status,
                           "duration_ms": entry["duration_ms"], "error": entry.get("error")})

    async def _process(self, msg: Message) -> None:
        reply_text: str | None = None
        try:
            msg.current_step = "agent_called"
            t0 = time.perf_counter()
            try:
                reply = await call_agent(self._session, msg.instance, msg.text, msg.user_id, msg.digits)
            except UpstreamError as exc:
                self._upstream_failed(msg, "agent", "agent_called", t0, exc)
                return
            extra = {}
            if reply.first_chunk_s is not None:
                extra["first_chunk_ms"] = int(round(reply.first_chunk_s * 1000))
                if self.metrics_on and not msg.synthetic:
                    metrics.child(metrics.AGENT_FIRST_CHUNK, msg.instance.name).observe(reply.first_chunk_s)
            self.record_step(msg, "agent_called", "success", time.perf_counter() - t0, **extra)
            reply_text = reply.text
            try:
                self._record_usage(msg, reply)
            except Exception as exc:  # telemetry must not fail a message the agent answered
                log.warning("agent usage not recorded", extra={
                    "event": "usage_failed", "trace_id": str(msg.trace_id), "error": str(exc)})

            msg.current_step = "evolution_send"
            t0 = time.perf_counter()
            try:
                reply_id, attempts = await send_evolution_retrying(
                    self._session, msg.instance, msg.reply_number or msg.digits, reply.text,
                    self.settings.evolution_timeout_s)
            except UpstreamError as exc:
                self._upstream_failed(msg, "evolution", "evolution_send", t0, exc, reply_text,
                                      attempts=exc.attempts)
                return
            self.record_step(msg, "evolution_send", "success", time.perf_counter() - t0,
                             attempts=attempts)
            self._finish(msg, "completed", None, None, reply_text, reply_id)
        except asyncio.CancelledError:
            self._interrupt(msg, "interrupted: service shutting down before the message finished",
                            reply_text)
        except Exception as exc:  # our own bug: record it honestly as `error`
            log.exception("message processing crashed", extra={
                "event": "pipeline_crashed", "trace_id": str(msg.trace_id), "instance": msg.instance.name})
            self._interrupt(msg, f"internal error: {type(exc).__name__}", reply_text)

    def _record_usage(self, msg: Message, reply) -> None:
        # Priced with the instance as loaded for this message: a later price change never
        # rewrites what a message cost.
        msg.input_tokens, msg.output_tokens = reply.input_tokens, reply.output_tokens
        msg.agent_session_id = reply.session_id
        msg.cost_usd = msg.instance.cost_usd(reply.input_tokens, reply.output_tokens)
        if not self.metrics_on or msg.synthetic:
            return
        name = msg.instance.name
        if reply.input_tokens:
            metrics.child(metrics.AGENT_TOKENS, name, "input").inc(reply.input_tokens)
        if reply.output_tokens:
            metrics.child(metrics.AGENT_TOKENS, name, "output").inc(reply.output_tokens)
        if msg.cost_usd:
            metrics.child(metrics.AGENT_COST, name).inc(float(msg.cost_usd))

    def _upstream_failed(self, msg: Message, upstream: str, step: str, t0: float,
                         exc: UpstreamError, reply_text: str | None = None, **extra) -> None:
        # Not for a canary: the SLOs subtract agent 4xx errors from omni_messages_total.
        if self.metrics_on and not msg.synthetic:
            metrics.UPSTREAM_ERRORS.labels(upstream=upstream, reason=exc.reason).inc()
        self.record_step(msg, step, "failed", time.perf_counter() - t0, str(exc), **extra)
        self._finish(msg, "failed", step, str(exc), reply_text)

    def _interrupt(self, msg: Message, reason: str, reply_text: str | None) -> None:
        step = msg.current_step
        if not any(s["step"] == step for s in msg.steps):
            self.record_step(msg, step, "failed", None, reason)
        self._finish(msg, "error", step, reason, reply_text)

    def _finish(self, msg: Message, status: str, failed_step: str | None, error: str | None,
                reply_text: str | None, reply_id: str | None = None) -> None:
        try:
            done = {s["step"] for s in msg.steps}
            for step in STEPS:
                if step not in done:
                    msg.steps.append({"step": step, "status": "skipped", "duration_ms": None,
                                      "timestamp": None})
            seconds = time.perf_counter() - msg.started
            duration_ms = int(round(seconds * 1000))
            if self.writer is not None:
                self.writer.finish(FinishedTrace(
                    trace_id=msg.trace_id, status=status, duration_ms=duration_ms,
                    response_content=reply_text if self.settings.store_message_content else None,
                    steps=msg.steps, failed_step=failed_step, error_message=error,
                    instance_id=msg.instance.id, reply_message_id=reply_id,
                    sent_at=utcnow() if reply_id else None,
                    input_tokens=msg.input_tokens, output_tokens=msg.output_tokens,
                    cost_usd=msg.cost_usd, agent_session_id=msg.agent_session_id))
            name = msg.instance.name
            if self.metrics_on and not msg.synthetic:
                metrics.child(metrics.MESSAGES, name, status).inc()
                metrics.child(metrics.MESSAGE_DURATION, name, status).observe(seconds)
            self._log_final(msg, status, failed_step, error, duration_ms, reply_text)
        finally:
            self.release()

    def _log_final(self, msg: Message, status: str, failed_step: str | None, error: str | None,
                   duration_ms: int, reply_text: str | None) -> None:
        fields = {"event": f"message_{status}", "trace_id": str(msg.trace_id),
                  "instance": msg.instance.name, "user_id": msg.user_id, "status": status,
                  "duration_ms": duration_ms}
        if failed_step:
            fields.update(step=failed_step, error=error)
        if msg.synthetic:
            fields["synthetic"] = True
        if self.settings.log_message_content:
            fields.update(message_content=msg.text, response_content=reply_text)
        level = logging.INFO if status == "completed" else logging.WARNING if status == "failed" else logging.ERROR
        log.log(level, "message %s in %d ms", status, duration_ms, extra=fields)
        # A slow canary is reported by its own canary_run line, not among users' slow messages.
        if duration_ms > self.settings.slow_message_seconds * 1000 and not msg.synthetic:
            log.warning("slow message: %d ms (threshold %g s)", duration_ms,
                        self.settings.slow_message_seconds,
                        extra={**fields, "event": "slow_message"})
