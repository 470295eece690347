"""The canary: one synthetic message per interval through the public webhook, followed to its end.

With AUTOMAGIK_OMNI_CANARY_INSTANCE set, every worker polls a one-row lease in PostgreSQL
(sql/011) and whichever claims the current interval, across all workers and replicas sharing
the database, posts an Evolution `messages.upsert` webhook to that instance the way
Evolution would (same URL, same secret), then reads the message's trace until it is final.
A run is `ok` when the message completed within the slow-message threshold, `slow` when it
completed later, `failed` otherwise (webhook refused, trace failed or error, or no final
status by the deadline). Counted in omni_canary_runs_total and omni_canary_duration_seconds
and logged as event `canary_run`; a run never raises out of the chore.

The mark. A canary message's id is `CANARY-<unix time>-<nonce>-<signature>`, the signature
an HMAC-SHA256 (keyed by a key derived from the service API key) of the instance name, time
and nonce. The webhook path marks a trace `synthetic` only when the signature verifies for
that instance and the time is recent: only a holder of the API key can hide a message from
the business figures, and an id seen once is answered `duplicate` ever after, so a captured
canary webhook cannot carry other traffic. A forged or stale mark is an ordinary message,
counted like any other.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass

from app.db import DatabaseError, DatabaseUnavailable
from app.telemetry.recorder import Recorder
from app.traces.store import TraceStore

log = logging.getLogger("omni.canary")

MARK_PREFIX = "CANARY-"
_MARK = re.compile(r"^CANARY-([0-9]{10})-([0-9A-F]{12})-([0-9A-F]{32})$")
# A mark is honoured this long after it was made (and this far ahead: clocks of replicas).
MARK_MAX_AGE_S = 300
MARK_MAX_AHEAD_S = 60
# Beyond the agent and Evolution timeouts: the writer's batching of final states, a wait for
# an in-flight slot, a busy database.
DEADLINE_MARGIN_S = 15.0
# The webhook answers once its trace row is committed (app/webhooks.py waits up to 10 s).
WEBHOOK_TIMEOUT_S = 15.0
_KEY_CONTEXT = b"omni canary mark v1"


def _mark_key(api_key: str) -> bytes:
    # A key of its own, derived from the API key: a signature never reveals or equals anything
    # the API key signs elsewhere.
    return hmac.new(api_key.encode(), _KEY_CONTEXT, hashlib.sha256).digest()


def _signature(instance: str, ts: str, nonce: str, api_key: str) -> str:
    msg = f"{instance}\n{ts}\n{nonce}".encode()
    return hmac.new(_mark_key(api_key), msg, hashlib.sha256).hexdigest()[:32].upper()


def sign_mark(instance: str, api_key: str, now: float | None = None, nonce: str | None = None) -> str:
    """A message id that marks a canary message for this instance."""
    ts = f"{int(time.time() if now is None else now):010d}"
    nonce = nonce or secrets.token_hex(6).upper()
    return f"{MARK_PREFIX}{ts}-{nonce}-{_signature(instance, ts, nonce, api_key)}"


def verify_mark(instance: str, message_id: str, api_key: str, now: float | None = None) -> bool:
    """True when message_id is a recent canary mark made with this API key for this instance."""
    found = _MARK.match(message_id)
    if found is None:
        return False
    ts, nonce, sig = found.groups()
    age = (time.time() if now is None else now) - int(ts)
    if not -MARK_MAX_AHEAD_S <= age <= MARK_MAX_AGE_S:
        return False
    return hmac.compare_digest(sig, _signature(instance, ts, nonce, api_key))


def is_synthetic(instance: str, message_id: str, api_key: str) -> bool:
    """Whether an accepted message is a canary's; a mark that does not verify is logged."""
    if not message_id.startswith(MARK_PREFIX):
        return False
    if verify_mark(instance, message_id, api_key):
        return True
    log.warning("canary mark not honoured: counted as an ordinary message", extra={
        "event": "canary_mark_rejected", "instance": instance, "message_id": message_id[:128]})
    return False


def classify(http_status: int | None, trace_status: str | None, duration_s: float,
             slow_s: float) -> str:
    """ok, slow or failed, from the webhook's answer and the trace's final status."""
    if http_status != 202 or trace_status != "completed":
        return "failed"
    # `>` like the slow_message log line: exactly at the threshold is not slow.
    return "slow" if duration_s > slow_s else "ok"


def default_url(host: str, port: int) -> str:
    """This service's own base URL for a bind address (wildcards become 127.0.0.1)."""
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def envelope(instance: str, message_id: str, number: str, text: str, now: float) -> dict:
    """The messages.upsert webhook Evolution API 2.x would post for this text."""
    return {
        "event": "messages.upsert", "instance": instance,
        "data": {"key": {"remoteJid": f"{number}@s.whatsapp.net", "fromMe": False, "id": message_id},
                 "pushName": "omni canary", "message": {"conversation": text},
                 "messageType": "conversation", "messageTimestamp": int(now)},
        "date_time": dt.datetime.fromtimestamp(now, dt.timezone.utc).isoformat(
            timespec="milliseconds").replace("+00:00", "Z"),
        "sender": f"{number}@s.whatsapp.net", "apikey": None,
    }


# Claims the run due now, if any. The upsert also recreates a deleted lease row. The next run
# is due one interval after the previous one was due (not after now), so runs keep their
# cadence whoever claims them and however late; after a pause it restarts from now.
@dataclass(frozen=True)
class Outcome:
    """What one canary run found."""

    result: str
    duration_s: float
    trace_id: str | None = None
    http_status: int | None = None
    trace_status: str | None = None
    error: str | None = None


class Canary:
    """The canary of one worker; run_once is its periodic chore."""

    def __init__(self, settings, instances, traces: TraceStore, recorder: Recorder, holder: str) -> None:
        self.settings = settings
        self.instances = instances
        self.traces = traces
        self.recorder = recorder
        self.holder = holder
        self.instance = settings.canary_instance
        self.interval_s = settings.canary_interval_s
        base = settings.canary_url or default_url(settings.host, settings.port)
        self.url = f"{base.rstrip('/')}/webhook/evolution/{self.instance}"
        # Workers look for a due run several times per interval so one starts close to its
        # time; each look is one indexed upsert of one row.
        self.poll_interval_s = min(5.0, max(0.2, self.interval_s / 5))
        # Straight to the URL: the canary checks the path Evolution takes, not a proxy's.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def run_once(self) -> None:
        """Run the canary when this worker claims the run due now; never raises."""
        try:
            run = self.traces.claim_canary_run(self.interval_s, self.holder)
        except Exception as exc:  # noqa: BLE001 - no claim, no run; the next poll tries again
            log.warning("canary lease not reachable", extra={"event": "canary_claim_failed",
                                                             "error": str(exc)})
            return
        if run is None:
            return
        outcome = self._run(run)
        self._record(run, outcome)

    def _run(self, run: int) -> Outcome:
        started = time.monotonic()
        trace_id = None
        try:
            inst = self.instances.lookup(self.instance)
            agent_timeout = inst.agent_timeout_s if inst is not None else 60.0
            deadline = started + agent_timeout + self.settings.evolution_timeout_s + DEADLINE_MARGIN_S
            now = time.time()
            mark = sign_mark(self.instance, self.settings.api_key, now)
            body = envelope(self.instance, mark, self.settings.canary_number,
                            f"omni canary run {run}: are you there?", now)
            status, answer = self._post(body, inst.webhook_secret if inst is not None else None)
            if status != 202 or not isinstance(answer, dict) or "trace_id" not in answer:
                why = answer.get("error") if isinstance(answer, dict) else None
                return Outcome("failed", time.monotonic() - started, http_status=status,
                               error=f"webhook answered {status}" + (f": {why}" if why else ""))
            trace_id = str(answer["trace_id"])
            trace = self._follow(uuid.UUID(trace_id), deadline)
            if trace is None:
                return Outcome("failed", time.monotonic() - started, trace_id, status,
                               error=f"no final status within {deadline - started:.0f} s")
            duration_s = (trace["duration_ms"] or 0) / 1000.0
            result = classify(status, trace["status"], duration_s, self.settings.slow_message_seconds)
            return Outcome(result, duration_s, trace_id, status, trace["status"],
                           error=trace.get("error_message") if result == "failed" else None)
        except Exception as exc:  # noqa: BLE001 - a canary that cannot run is a failed run
            return Outcome("failed", time.monotonic() - started, trace_id,
                           error=f"{type(exc).__name__}: {exc}")

    def _post(self, body: dict, secret: str | None) -> tuple[int, object]:
        headers = {"Content-Type": "application/json", "User-Agent": "omni-canary"}
        if secret:
            headers["x-webhook-secret"] = secret
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers,
                                     method="POST")
        try:
            with self._opener.open(req, timeout=WEBHOOK_TIMEOUT_S) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, None

    def _follow(self, trace_id: uuid.UUID, deadline: float) -> dict | None:
        """The trace once final, read through the store; None if still unfinished at deadline."""
        pause = 0.05
        while True:
            try:
                row = self.traces.get(trace_id)
            except (DatabaseUnavailable, DatabaseError):
                row = None  # the database may come back before the deadline
            if row is not None and row["status"] != "processing":
                return row
            if time.monotonic() + pause > deadline:
                return None
            time.sleep(pause)
            pause = min(0.5, pause * 1.5)

    def _record(self, run: int, outcome: Outcome) -> None:
        duration_ms = int(round(outcome.duration_s * 1000))
        try:
            self.recorder.canary_run(outcome.result, outcome.duration_s)
        except Exception as exc:  # noqa: BLE001 - telemetry never breaks the chore
            log.warning("canary metrics not recorded", extra={"event": "canary_metrics_failed",
                                                              "error": str(exc)})
        level = logging.INFO if outcome.result == "ok" else logging.WARNING
        log.log(level, "canary run %d %s in %d ms", run, outcome.result, duration_ms, extra={
            "event": "canary_run", "result": outcome.result, "run": run, "trace_id": outcome.trace_id,
            "duration_ms": duration_ms, "instance": self.instance, "holder": self.holder,
            "http_status": outcome.http_status, "status": outcome.trace_status, "error": outcome.error})
        try:
            self.traces.canary_run_done(outcome.result, outcome.trace_id)
        except Exception:  # noqa: BLE001 - the lease row is a convenience for operators
            pass
