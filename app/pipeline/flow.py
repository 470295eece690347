"""The message's steps after the webhook accepted it, in order, and its final trace.

STEPS below is the whole flow: each step is a coroutine that reads and fills the Message
and raises UpstreamError when its dependency fails. `Flow.process` runs them, records each
one (trace entry, metric, log line), and writes the final state once.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from app import vocabulary
from app.config import Settings
from app.pipeline.admission import Admission
from app.pipeline.loop import LoopThread
from app.pipeline.message import Message
from app.telemetry.recorder import NullRecorder, Recorder
from app.traces.store import FinishedTrace
from app.traces.writer import TraceWriter
from app.upstream import UpstreamError, call_agent, send_evolution_retrying
from app.vocabulary import utcnow

log = logging.getLogger("omni.pipeline")
_QUIET = NullRecorder()


@dataclass(frozen=True)
class Step:
    """One processing step: its name (vocabulary.STEPS), the upstream it calls, its code."""

    name: str
    upstream: str
    run: Callable[["Flow", Message], Awaitable[dict]]  # returns extra fields of the step entry
    retried: bool = False  # its failures carry how many attempts were made


async def agent_called(flow: "Flow", msg: Message) -> dict:
    """Ask the instance's agent; its reply and token usage go on the message."""
    reply = await call_agent(flow.loop.session, msg.instance, msg.text, msg.user_id, msg.digits)
    msg.reply_text = reply.text
    try:
        # Priced with the instance as loaded for this message: a later price change never
        # rewrites what a message cost.
        msg.input_tokens, msg.output_tokens = reply.input_tokens, reply.output_tokens
        msg.agent_session_id = reply.session_id
        msg.cost_usd = msg.instance.cost_usd(reply.input_tokens, reply.output_tokens)
        flow.recorder_for(msg).agent_usage(msg.instance.name, msg.input_tokens, msg.output_tokens, msg.cost_usd)
    except Exception as exc:  # telemetry must not fail a message the agent answered
        log.warning("agent usage not recorded", extra={
            "event": "usage_failed", "trace_id": str(msg.trace_id), "error": str(exc)})
    if reply.first_chunk_s is None:
        return {}
    flow.recorder_for(msg).agent_first_chunk(msg.instance.name, reply.first_chunk_s)
    return {"first_chunk_ms": int(round(reply.first_chunk_s * 1000))}


async def evolution_send(flow: "Flow", msg: Message) -> dict:
    """Send the agent's reply through the Evolution API (retried while nothing was delivered)."""
    assert msg.reply_text is not None
    msg.reply_id, attempts = await send_evolution_retrying(
        flow.loop.session, msg.instance, msg.reply_number or msg.digits, msg.reply_text,
        flow.settings.evolution_timeout_s)
    return {"attempts": attempts}


STEPS = (Step("agent_called", "agent", agent_called),
         Step("evolution_send", "evolution", evolution_send, retried=True))
assert vocabulary.INTAKE_STEPS + tuple(s.name for s in STEPS) == vocabulary.STEPS


class Flow:
    """Runs accepted messages through STEPS on the loop and finishes their traces."""

    def __init__(self, settings: Settings, loop: LoopThread, admission: Admission,
                 writer: TraceWriter | None, recorder: Recorder) -> None:
        self.settings = settings
        self.loop = loop
        self.admission = admission
        self.writer = writer
        self.recorder = recorder

    def recorder_for(self, msg: Message) -> Recorder:
        """The recorder of a message's metrics: none for a canary's, so no SLO or business
        figure counts it (the canary has metrics of its own)."""
        return _QUIET if msg.synthetic else self.recorder

    def submit(self, msg: Message) -> None:
        """Hand an accepted message (slot already reserved) to the loop."""
        self.loop.spawn(self.process(msg))

    def record(self, msg: Message, step: str, status: str, seconds: float | None,
               error: str | None = None, **extra) -> None:
        """Record a step on the message and emit its metric and log line now."""
        self.emit(msg, msg.record(step, status, seconds, error, **extra), seconds)

    def emit_steps(self, msg: Message, timings: dict[str, float]) -> None:
        """Emit the steps the webhook recorded before the message was accepted."""
        for entry in msg.steps:
            if entry["step"] in timings:
                self.emit(msg, entry, timings[entry["step"]])

    def emit(self, msg: Message, entry: dict, seconds: float | None) -> None:
        """The metric and the log line of one step entry."""
        step, status = entry["step"], entry["status"]
        if seconds is not None:
            self.recorder_for(msg).step(msg.instance.name, step, status, seconds)
        if self.settings.enable_detailed_logging and status != "skipped":
            log.log(logging.WARNING if status == "failed" else logging.INFO,
                    "step %s %s", step, status,
                    extra={"event": "step_completed" if status == "success" else "step_failed",
                           "trace_id": str(msg.trace_id), "instance": msg.instance.name,
                           "user_id": msg.user_id, "step": step, "status": status,
                           "duration_ms": entry["duration_ms"], "error": entry.get("error")})

    async def process(self, msg: Message) -> None:
        """Run the steps; the message ends completed, failed (an upstream) or error (ours)."""
        try:
            for step in STEPS:
                msg.current_step = step.name
                t0 = time.perf_counter()
                try:
                    extra = await step.run(self, msg)
                except UpstreamError as exc:
                    self.recorder_for(msg).upstream_failed(step.upstream, exc.reason)
                    more = {"attempts": exc.attempts} if step.retried else {}
                    self.record(msg, step.name, "failed", time.perf_counter() - t0, str(exc), **more)
                    self.finish(msg, "failed", step.name, str(exc))
                    return
                self.record(msg, step.name, "success", time.perf_counter() - t0, **extra)
            self.finish(msg, "completed", None, None)
        except asyncio.CancelledError:
            self._interrupt(msg, "interrupted: service shutting down before the message finished")
        except Exception as exc:  # our own bug: record it honestly as `error`
            log.exception("message processing crashed", extra={
                "event": "pipeline_crashed", "trace_id": str(msg.trace_id), "instance": msg.instance.name})
            self._interrupt(msg, f"internal error: {type(exc).__name__}")

    def _interrupt(self, msg: Message, reason: str) -> None:
        step = msg.current_step
        if not any(s["step"] == step for s in msg.steps):
            self.record(msg, step, "failed", None, reason)
        self.finish(msg, "error", step, reason)

    def finish(self, msg: Message, status: str, failed_step: str | None, error: str | None) -> None:
        """Write the final trace, count and log the message, give back its slot."""
        try:
            done = {s["step"] for s in msg.steps}
            for step in vocabulary.STEPS:
                if step not in done:
                    msg.steps.append({"step": step, "status": "skipped", "duration_ms": None,
                                      "timestamp": None})
            seconds = time.perf_counter() - msg.started
            duration_ms = int(round(seconds * 1000))
            if self.writer is not None:
                self.writer.finish(FinishedTrace(
                    trace_id=msg.trace_id, status=status, duration_ms=duration_ms,
                    response_content=msg.reply_text if self.settings.store_message_content else None,
                    steps=msg.steps, failed_step=failed_step, error_message=error,
                    instance_id=msg.instance.id, reply_message_id=msg.reply_id,
                    sent_at=utcnow() if msg.reply_id else None,
                    input_tokens=msg.input_tokens, output_tokens=msg.output_tokens,
                    cost_usd=msg.cost_usd, agent_session_id=msg.agent_session_id))
            self.recorder_for(msg).message(msg.instance.name, status, seconds)
            self._log_final(msg, status, failed_step, error, duration_ms)
        finally:
            self.admission.release()

    def _log_final(self, msg: Message, status: str, failed_step: str | None, error: str | None,
                   duration_ms: int) -> None:
        fields = {"event": f"message_{status}", "trace_id": str(msg.trace_id),
                  "instance": msg.instance.name, "user_id": msg.user_id, "status": status,
                  "duration_ms": duration_ms}
        if failed_step:
            fields.update(step=failed_step, error=error)
        if msg.synthetic:
            fields["synthetic"] = True
        if self.settings.log_message_content:
            fields.update(message_content=msg.text, response_content=msg.reply_text)
        level = logging.INFO if status == "completed" else logging.WARNING if status == "failed" else logging.ERROR
        log.log(level, "message %s in %d ms", status, duration_ms, extra=fields)
        # A slow canary is reported by its own canary_run line, not among users' slow messages.
        if duration_ms > self.settings.slow_message_seconds * 1000 and not msg.synthetic:
            log.warning("slow message: %d ms (threshold %g s)", duration_ms,
                        self.settings.slow_message_seconds,
                        extra={**fields, "event": "slow_message"})
