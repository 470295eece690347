"""POST /webhook/evolution/{instance_name}: every case of the SPEC 4.3 table."""
from __future__ import annotations

import datetime as dt
import logging
import time
from concurrent.futures import TimeoutError as FutureTimeout

from flask import Blueprint, current_app, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from app import canary, evolution
from app.web.auth import client_ip
from app.db import DatabaseError, DatabaseUnavailable
from app.web import jsonsafe
from app.web.errors import ApiError
from app.pipeline.message import Message
from app.runtime import Runtime, runtime
from app.telemetry.logs import REDACTOR
from app.traces.store import NewTrace, ReceiptRow
from app.traces.writer import new_trace_id
from app.vocabulary import INTAKE_STEPS, utcnow

bp = Blueprint("webhooks", __name__)
log = logging.getLogger("omni.webhook")

# How long a webhook waits for the commit of its trace row before answering 503.
COMMIT_WAIT_S = 10.0
RETRY_AFTER_DB = "5"
RETRY_AFTER_BUSY = "2"


def _reject(status: int, reason: str, message: str, *, headers: dict | None = None,
            level: int = logging.INFO, **fields) -> ApiError:
    runtime().recorder.webhook_rejected(reason)
    log.log(level, "webhook rejected: %s", message, extra={
        "event": "webhook_rejected", "reason": reason, "status": status, "client_ip": client_ip(),
        **fields})
    return ApiError(status, message, headers=headers)


def _parse_body() -> dict:
    if request.mimetype != "application/json":
        raise _reject(415, "malformed", "Content-Type must be application/json")
    try:
        raw = request.get_data(cache=False)
    except RequestEntityTooLarge:
        raise _reject(413, "too_large", "request body too large (limit 1 MiB)") from None
    try:
        body = jsonsafe.loads(raw)
    except ValueError as exc:
        why = "body is not valid UTF-8" if isinstance(exc, UnicodeDecodeError) else "body is not valid JSON"
        if "surrogate" in str(exc) or "nested" in str(exc):
            why = f"body is not valid JSON: {exc}"
        raise _reject(400, "malformed", why) from None
    if not isinstance(body, dict):
        raise _reject(400, "malformed", "body must be a JSON object")
    if not isinstance(body.get("event"), str):
        raise _reject(400, "malformed", "missing field: event (string)")
    return body


@bp.post("/webhook/evolution/<instance_name>", defaults={"event": None})
@bp.post("/webhook/evolution/<instance_name>/<event>")  # Evolution's webhookByEvents URLs
def evolution_webhook(instance_name: str, event: str | None):
    """Record the message, hand it to the pipeline, answer at once."""
    started = time.perf_counter()
    received_at = utcnow()
    rt = runtime()
    settings = rt.settings
    ip = client_ip()
    if settings.webhook_rate_per_address and rt.webhook_rate_address.hit(ip) > settings.webhook_rate_per_address:
        raise _reject(429, "rate_limited", "too many webhooks from this address",
                      headers={"Retry-After": str(rt.webhook_rate_address.retry_after(ip))})
    if (request.content_length or 0) > current_app.config["MAX_CONTENT_LENGTH"]:
        raise _reject(413, "too_large", "request body too large (limit 1 MiB)")
    body = _parse_body()
    t_received = time.perf_counter() - started

    t0 = time.perf_counter()
    try:
        inst = rt.instances.lookup(instance_name)
    except (DatabaseUnavailable, DatabaseError):
        rt.recorder.upstream_failed("database", "unavailable")
        raise _reject(503, "database_unavailable", "database unavailable; retry later",
                      headers={"Retry-After": RETRY_AFTER_DB}, level=logging.ERROR) from None
    if inst is None:
        raise _reject(404, "unknown_instance", f"unknown instance: {instance_name[:64]}")
    if not inst.enabled:
        raise _reject(404, "disabled_instance", f"instance is disabled: {inst.name}")
    if inst.webhook_secret:
        REDACTOR.add(inst.webhook_secret)
        given = request.headers.get("x-webhook-secret") or request.args.get("token")
        try:
            rt.guard.require_webhook_secret(given, inst.webhook_secret, instance=inst.name)
        except ApiError as exc:
            if exc.status == 429:
                raise _reject(429, "rate_limited", exc.message, headers=exc.headers,
                              instance=inst.name) from None
            raise _reject(401, "bad_secret", "missing or invalid webhook secret", instance=inst.name) from None
    if settings.webhook_rate_per_instance and \
            rt.webhook_rate_instance.hit(inst.name) > settings.webhook_rate_per_instance:
        raise _reject(429, "rate_limited", f"too many webhooks for instance {inst.name}",
                      headers={"Retry-After": str(rt.webhook_rate_instance.retry_after(inst.name))})
    t_validated = time.perf_counter() - t0

    t1 = time.perf_counter()
    try:
        parsed = evolution.read_webhook(body)
    except evolution.Malformed as exc:
        raise _reject(400, "malformed", str(exc), instance=inst.name) from None
    if isinstance(parsed, evolution.Ignored):
        return _ignored(rt, inst, body, parsed)
    if isinstance(parsed, evolution.Receipt):
        return _receipt(rt, inst, body, parsed)
    user_id, digits = _sender(rt, parsed)
    t_received += time.perf_counter() - t1
    return _accept(rt, inst, parsed, user_id, digits, received_at, started, t_received, t_validated)


def _ignored(rt: Runtime, inst, body: dict, ignored: evolution.Ignored):
    rt.recorder.webhook_ignored(ignored.reason)
    data = body.get("data")
    key = data.get("key") if isinstance(data, dict) else None
    msg_id = key.get("id") if isinstance(key, dict) else None
    # A message left unanswered is worth a line an operator can find; other events are not.
    level = logging.DEBUG if ignored.reason in ("event", "list_data", "receipt") else logging.INFO
    log.log(level, "webhook ignored: %s", ignored.detail, extra={
        "event": "webhook_ignored", "reason": ignored.reason, "instance": inst.name,
        "message_id": msg_id if isinstance(msg_id, str) else None})
    return jsonify(status="ignored", reason=ignored.reason, detail=ignored.detail), 200


def _receipt(rt: Runtime, inst, body: dict, receipt: evolution.Receipt):
    if rt.writer is None:
        return _ignored(rt, inst, body, evolution.Ignored("receipt", "tracing is off: receipts are not recorded"))
    rt.writer.receipt(ReceiptRow(instance_id=inst.id, instance_name=inst.name,
                                 reply_message_id=receipt.message_id, status=receipt.status,
                                 at=utcnow()))
    return jsonify(status="recorded", receipt=receipt.status), 200


def _sender(rt: Runtime, msg: evolution.Inbound) -> tuple[str, str]:
    """(user_id, digits of the agent session) of a message, one per person across LID and phone."""
    phone = msg.phone
    if msg.lid is not None:
        if phone is not None:
            rt.contacts.learn(msg.lid, phone)
        else:
            phone = rt.contacts.phone_for(msg.lid)
    if phone is not None:
        return "whatsapp:+" + phone, phone
    assert msg.lid is not None  # the parser gives a phone, a LID or both
    return "whatsapp:lid:" + msg.lid, msg.lid


def _accept(rt: Runtime, inst, inbound: evolution.Inbound, user_id: str, digits: str,
            received_at: dt.datetime, started: float, t_received: float, t_validated: float):
    settings = rt.settings
    admission = rt.admission
    synthetic = canary.is_synthetic(inst.name, inbound.message_id, settings.api_key)
    msg = Message(trace_id=new_trace_id(), instance=inst, user_id=user_id, digits=digits,
                  text=inbound.text, received_at=received_at, started=started,
                  reply_number=inbound.reply_number, synthetic=synthetic)
    recorder = rt.flow.recorder_for(msg)
    recorder.instance_seen(inst.name)
    timings = dict(zip(INTAKE_STEPS, (t_received, t_validated)))
    for step, seconds in timings.items():
        msg.record(step, "success", seconds)

    if not admission.try_reserve(settings.overload_wait_s):
        raise _reject(503, "overloaded", "service overloaded; retry later",
                      headers={"Retry-After": RETRY_AFTER_BUSY}, level=logging.WARNING, instance=inst.name)
    pending = None
    try:
        if rt.writer is not None:
            row = NewTrace(trace_id=msg.trace_id, instance_id=inst.id, instance_name=inst.name,
                           message_id=inbound.message_id, user_id=user_id,
                           message_content=msg.text if settings.store_message_content else None,
                           created_at=received_at, steps=list(msg.steps), owner=rt.owner,
                           message_type=inbound.message_type, remote_jid=inbound.remote_jid,
                           platform_timestamp=inbound.platform_ts, synthetic=synthetic)
            pending = rt.writer.insert(row)
            trace_id, inserted = pending.result(timeout=COMMIT_WAIT_S)
        else:
            trace_id, inserted = rt.recent_ids.claim(inst.id, inbound.message_id, msg.trace_id)
    except FutureTimeout:
        # The insert is still queued or running and may yet commit. If it does, the row
        # exists and every redelivery will be answered `duplicate`, so this worker must
        # process it then: the slot stays reserved for it until the insert's outcome is known.
        assert pending is not None  # only the writer's insert can time out
        pending.add_done_callback(lambda fut: _late_commit(rt, msg, timings, fut))
        raise _reject(503, "database_unavailable", "database too slow; the message was not "
                      "recorded yet, retry later", headers={"Retry-After": RETRY_AFTER_DB},
                      level=logging.ERROR, instance=inst.name) from None
    except DatabaseUnavailable:
        admission.release()
        raise _reject(503, "database_unavailable", "database unavailable; the message was not "
                      "recorded, retry later", headers={"Retry-After": RETRY_AFTER_DB},
                      level=logging.ERROR, instance=inst.name) from None
    except BaseException:
        admission.release()
        raise
    if not inserted:
        admission.release()
        log.info("duplicate delivery", extra={"event": "webhook_duplicate", "trace_id": str(trace_id),
                                              "instance": inst.name})
        return jsonify(status="duplicate", trace_id=str(trace_id)), 200
    rt.flow.emit_steps(msg, timings)
    if inbound.platform_ts is not None:
        recorder.webhook_lag(inst.name, (received_at - inbound.platform_ts).total_seconds())
    rt.flow.submit(msg)
    return jsonify(status="accepted", trace_id=str(msg.trace_id), instance=inst.name), 202


def _late_commit(rt: Runtime, msg: Message, timings: dict[str, float], fut) -> None:
    """Process a message whose row committed after its webhook was answered 503.

    Runs in the writer thread (or at once if the insert already ended). The unique key
    decides: only the delivery whose insert won processes the message, whichever worker
    each redelivery reaches; the others are answered `duplicate`.
    """
    try:
        inserted = fut.exception() is None and fut.result()[1]
        if inserted and rt.admission.accepting:
            log.warning("trace row committed after its webhook timed out; processing it",
                        extra={"event": "webhook_late_commit", "trace_id": str(msg.trace_id),
                               "instance": msg.instance.name})
            rt.flow.emit_steps(msg, timings)
            rt.flow.submit(msg)
            return
        if inserted:
            # Shutting down: the row stays `processing` under this worker's owner, and the
            # recovery at worker exit marks it `error`.
            log.error("trace row committed late during shutdown; not processed",
                      extra={"event": "webhook_late_commit_dropped", "trace_id": str(msg.trace_id),
                             "instance": msg.instance.name})
    except Exception:  # noqa: BLE001 - a callback error must not leak the slot
        log.exception("late commit handover failed", extra={"event": "webhook_late_commit_failed",
                                                             "trace_id": str(msg.trace_id)})
    rt.admission.release()
