"""POST /webhook/evolution/{instance_name}: every case of the SPEC 4.3 table."""
from __future__ import annotations

import datetime as dt
import logging
import re
import time
from concurrent.futures import TimeoutError as FutureTimeout

from flask import Blueprint, current_app, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from app.auth import client_ip
from app.db import DatabaseError, DatabaseUnavailable
from app import jsonsafe
from app.errors import ApiError
from app.pipeline import Message, utcnow
from app.telemetry import metrics
from app.telemetry.logs import REDACTOR
from app.traces.store import NewTrace
from app.traces.writer import new_trace_id

bp = Blueprint("webhooks", __name__)
log = logging.getLogger("omni.webhook")

MESSAGE_EVENTS = {"messages.upsert", "messages_upsert"}
JID_RE = re.compile(r"^([0-9]{5,20})(?::[0-9]+)?@s\.whatsapp\.net$")
# How long a webhook waits for the commit of its trace row before answering 503.
COMMIT_WAIT_S = 10.0
RETRY_AFTER_DB = "5"
RETRY_AFTER_BUSY = "2"


def _reject(status: int, reason: str, message: str, *, headers: dict | None = None,
            level: int = logging.INFO, **fields) -> ApiError:
    rt = current_app.extensions["omni"]
    if rt.settings.enable_metrics:
        metrics.WEBHOOK_REJECTED.labels(reason=reason).inc()
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


def _field(obj: dict, name: str, kind: type | tuple, path: str, required: bool = True):
    value = obj.get(name)
    if value is None:
        if required:
            raise _reject(400, "malformed", f"missing field: {path}")
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _reject(400, "malformed", f"wrong type for field: {path}")
    return value


def _message_fields(body: dict) -> tuple[str | None, dict]:
    """(reason to ignore or None, parsed fields); 400 on a malformed messages.upsert."""
    data = _field(body, "data", dict, "data")
    key = _field(data, "key", dict, "data.key")
    jid = _field(key, "remoteJid", str, "data.key.remoteJid")
    msg_id = _field(key, "id", str, "data.key.id")
    from_me = _field(key, "fromMe", bool, "data.key.fromMe", required=False)
    _field(data, "messageTimestamp", (int, str), "data.messageTimestamp", required=False)
    _field(data, "pushName", str, "data.pushName", required=False)
    if not 1 <= len(msg_id) <= 128:
        raise _reject(400, "malformed", "data.key.id must be 1 to 128 characters")
    if "\x00" in msg_id:  # PostgreSQL text cannot hold NUL; an id is never rewritten
        raise _reject(400, "malformed", "data.key.id must not contain NUL characters")
    message = _field(data, "message", dict, "data.message", required=False) or {}
    text = message.get("conversation")
    if not isinstance(text, str) or not text.strip():
        ext = message.get("extendedTextMessage")
        text = ext.get("text") if isinstance(ext, dict) else None
    if from_me:
        return "message sent by this instance (fromMe)", {}
    match = JID_RE.match(jid)
    if not match:
        if jid.endswith("@g.us") or jid.endswith("@broadcast"):
            return "group and broadcast messages are not handled", {}
        raise _reject(400, "malformed", "data.key.remoteJid is not a WhatsApp user JID")
    if not isinstance(text, str) or not text.strip():
        return "message has no text", {}
    return None, {"message_id": msg_id, "digits": match.group(1), "text": text}


@bp.post("/webhook/evolution/<instance_name>")
def evolution_webhook(instance_name: str):
    """Record the message, hand it to the pipeline, answer at once."""
    started = time.perf_counter()
    received_at = utcnow()
    rt = current_app.extensions["omni"]
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
        if settings.enable_metrics:
            metrics.UPSTREAM_ERRORS.labels(upstream="database", reason="unavailable").inc()
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

    event = body["event"].lower()
    if event not in MESSAGE_EVENTS:
        return jsonify(status="ignored", reason=f"event {body['event'][:64]} is not handled"), 200
    t1 = time.perf_counter()
    ignore, fields = _message_fields(body)
    t_received += time.perf_counter() - t1
    if ignore:
        return jsonify(status="ignored", reason=ignore), 200
    return _accept(rt, inst, fields, received_at, started, t_received, t_validated)


def _accept(rt, inst, fields: dict, received_at: dt.datetime, started: float,
            t_received: float, t_validated: float):
    settings = rt.settings
    pipeline = rt.pipeline
    if settings.enable_metrics:
        metrics.seed_instance(inst.name)
    user_id = "whatsapp:+" + fields["digits"]
    msg = Message(trace_id=new_trace_id(), instance=inst, user_id=user_id, digits=fields["digits"],
                  text=fields["text"], received_at=received_at, started=started)
    pipeline.record_step(msg, "webhook_received", "success", t_received, emit=False)
    pipeline.record_step(msg, "instance_validated", "success", t_validated, emit=False)

    if not pipeline.try_reserve(settings.overload_wait_s):
        raise _reject(503, "overloaded", "service overloaded; retry later",
                      headers={"Retry-After": RETRY_AFTER_BUSY}, level=logging.WARNING, instance=inst.name)
    timings = {"webhook_received": t_received, "instance_validated": t_validated}
    pending = None
    try:
        if rt.writer is not None:
            row = NewTrace(trace_id=msg.trace_id, instance_id=inst.id, instance_name=inst.name,
                           message_id=fields["message_id"], user_id=user_id,
                           message_content=msg.text if settings.store_message_content else None,
                           created_at=received_at, steps=list(msg.steps), owner=pipeline.owner)
            pending = rt.writer.insert(row)
            trace_id, inserted = pending.result(timeout=COMMIT_WAIT_S)
        else:
            trace_id, inserted = rt.recent_ids.claim(inst.id, fields["message_id"], msg.trace_id)
    except FutureTimeout:
        # The insert is still queued or running and may yet commit. If it does, the row
        # exists and every redelivery will be answered `duplicate`, so this worker must
        # process it then: the slot stays reserved for it until the insert's outcome is known.
        pending.add_done_callback(lambda fut: _late_commit(pipeline, msg, timings, fut))
        raise _reject(503, "database_unavailable", "database too slow; the message was not "
                      "recorded yet, retry later", headers={"Retry-After": RETRY_AFTER_DB},
                      level=logging.ERROR, instance=inst.name) from None
    except DatabaseUnavailable:
        pipeline.release()
        raise _reject(503, "database_unavailable", "database unavailable; the message was not "
                      "recorded, retry later", headers={"Retry-After": RETRY_AFTER_DB},
                      level=logging.ERROR, instance=inst.name) from None
    except BaseException:
        pipeline.release()
        raise
    if not inserted:
        pipeline.release()
        log.info("duplicate delivery", extra={"event": "webhook_duplicate", "trace_id": str(trace_id),
                                              "instance": inst.name})
        return jsonify(status="duplicate", trace_id=str(trace_id)), 200
    pipeline.emit_steps(msg, timings)
    pipeline.submit(msg)
    return jsonify(status="accepted", trace_id=str(msg.trace_id), instance=inst.name), 202


def _late_commit(pipeline, msg: Message, timings: dict[str, float], fut) -> None:
    """Process a message whose row committed after its webhook was answered 503.

    Runs in the writer thread (or at once if the insert already ended). The unique key
    decides: only the delivery whose insert won processes the message, whichever worker
    each redelivery reaches; the others are answered `duplicate`.
    """
    try:
        inserted = fut.exception() is None and fut.result()[1]
        if inserted and pipeline.accepting:
            log.warning("trace row committed after its webhook timed out; processing it",
                        extra={"event": "webhook_late_commit", "trace_id": str(msg.trace_id),
                               "instance": msg.instance.name})
            pipeline.emit_steps(msg, timings)
            pipeline.submit(msg)
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
    pipeline.release()
