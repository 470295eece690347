"""What the service measures, by what happened: one method per event, metrics behind it.

Callers say `recorder.step(...)` or `recorder.webhook_rejected(...)` and never test whether
metrics are on: `recorder_for(settings)` hands out a NullRecorder when they are off.
"""
from __future__ import annotations

import time
from decimal import Decimal

from app.telemetry import metrics
from app.telemetry.metrics import child


class Recorder:
    """Records into the Prometheus metrics of app/telemetry/metrics.py."""

    def started(self, version: str, cost_budget_usd_per_day: float) -> None:
        """A worker started: the series known in advance at 0, build info, resources."""
        metrics.seed_static(version, cost_budget_usd_per_day)
        metrics.sample_worker_resources()

    def sample_resources(self) -> None:
        """This worker's memory, CPU, sockets and threads (a periodic chore)."""
        metrics.sample_worker_resources()

    def instance_seen(self, instance: str) -> None:
        """An instance's message and step series exist (at 0) from its first message on."""
        metrics.seed_instance(instance)

    def http_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """One HTTP request served."""
        child(metrics.HTTP_DURATION, method, route, str(status)).observe(seconds)

    def webhook_rejected(self, reason: str) -> None:
        """A webhook refused with a 4xx or 503."""
        child(metrics.WEBHOOK_REJECTED, reason).inc()

    def webhook_ignored(self, reason: str) -> None:
        """A valid webhook answered 200 ignored."""
        child(metrics.WEBHOOK_IGNORED, reason).inc()

    def webhook_lag(self, instance: str, seconds: float) -> None:
        """Arrival here minus WhatsApp's timestamp of an accepted message."""
        child(metrics.WEBHOOK_LAG, instance).observe(max(0.0, seconds))

    def auth_failed(self, reason: str) -> None:
        """A failed authentication."""
        child(metrics.AUTH_FAILURES, reason).inc()

    def upstream_failed(self, upstream: str, reason: str) -> None:
        """A failed call to a dependency (agent, evolution, database, loki)."""
        child(metrics.UPSTREAM_ERRORS, upstream, reason).inc()

    def log_records_dropped(self, n: int) -> None:
        """Log records Loki will never get."""
        metrics.LOG_RECORDS_DROPPED.inc(n)

    def in_flight(self, delta: int) -> None:
        """A message took (+1) or gave back (-1) an in-flight slot."""
        metrics.IN_FLIGHT.inc(delta)

    def step(self, instance: str, step: str, status: str, seconds: float) -> None:
        """One processing step ended."""
        child(metrics.STEP_DURATION, instance, step, status).observe(seconds)

    def agent_first_chunk(self, instance: str, seconds: float) -> None:
        """The agent's stream sent its first chunk."""
        child(metrics.AGENT_FIRST_CHUNK, instance).observe(seconds)

    def agent_usage(self, instance: str, input_tokens: int | None, output_tokens: int | None,
                    cost_usd: Decimal | None) -> None:
        """Tokens the agent reported and what they cost."""
        if input_tokens:
            child(metrics.AGENT_TOKENS, instance, "input").inc(input_tokens)
        if output_tokens:
            child(metrics.AGENT_TOKENS, instance, "output").inc(output_tokens)
        if cost_usd:
            child(metrics.AGENT_COST, instance).inc(float(cost_usd))

    def message(self, instance: str, status: str, seconds: float) -> None:
        """A message reached its final status."""
        child(metrics.MESSAGES, instance, status).inc()
        child(metrics.MESSAGE_DURATION, instance, status).observe(seconds)

    def canary_configured(self, interval_s: float | None) -> None:
        """The canary's run counters at 0 and its interval (None: no canary) for the alert."""
        metrics.seed_canary(interval_s)

    def canary_run(self, result: str, seconds: float) -> None:
        """One canary run ended (ok, slow or failed)."""
        child(metrics.CANARY_RUNS, result).inc()
        metrics.CANARY_DURATION.observe(seconds)
        child(metrics.CANARY_LAST_RUN, result).set(time.time())

    def reply_receipt(self, instance: str, status: str, seconds: float) -> None:
        """The first delivery or read receipt of a reply we sent."""
        child(metrics.REPLY_RECEIPT, instance, status).observe(max(0.0, seconds))


class NullRecorder(Recorder):
    """Records nothing: AUTOMAGIK_OMNI_ENABLE_METRICS=false."""


def _nothing(*_args, **_kwargs) -> None:
    return None


for _name in [n for n in vars(Recorder) if not n.startswith("_")]:
    setattr(NullRecorder, _name, staticmethod(_nothing))


def recorder_for(enabled: bool) -> Recorder:
    """A Recorder, or a NullRecorder when metrics are off."""
    return Recorder() if enabled else NullRecorder()
