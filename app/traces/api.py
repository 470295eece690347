"""The trace API (SPEC 4.6): list with filters and cursors, one trace, analytics, delete."""
from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from urllib.parse import urlencode

from flask import Blueprint, jsonify, request

from app.web.auth import audit, guard
from app.web.errors import ApiError
from app.traces.store import TraceFilter
from app.vocabulary import ANALYTICS_INTERVALS, STEPS, TRACE_STATUSES, iso
from app.runtime import runtime

bp = Blueprint("traces", __name__, url_prefix="/api/v1/traces")
MAX_STRING = 256


@bp.before_request
def _auth() -> None:
    guard().require_api_key()


def _store():
    return runtime().traces


def bad(param: str, why: str) -> ApiError:
    """A 400 naming the parameter."""
    return ApiError(400, f"invalid parameter {param}: {why}", {"parameter": param})


def parse_int(name: str, lo: int, hi: int, default: int | None = None) -> int | None:
    """An integer query parameter within [lo, hi] (default when absent)."""
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise bad(name, f"{raw[:40]!r} is not a whole number") from None
    if not lo <= value <= hi:
        raise bad(name, f"must be between {lo} and {hi}")
    return value


def parse_date(name: str) -> dt.datetime | None:
    """An ISO 8601 date or date-time; naive values are taken as UTC."""
    raw = request.args.get(name)
    if raw is None:
        return None
    try:
        value = dt.datetime.fromisoformat(raw.strip())
    except ValueError:
        raise bad(name, f"{raw[:40]!r} is not an ISO 8601 date") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    if not 1970 <= value.year <= 9999:
        raise bad(name, "year must be between 1970 and 9999")
    return value


def parse_str(name: str, choices: tuple[str, ...] | None = None) -> str | None:
    """A string parameter, optionally one of choices."""
    raw = request.args.get(name)
    if raw is None:
        return None
    if choices is not None and raw not in choices:
        raise bad(name, f"must be one of {', '.join(choices)}")
    if not raw or len(raw) > MAX_STRING or "\x00" in raw:
        raise bad(name, f"must be 1 to {MAX_STRING} characters")
    return raw


def parse_bool(name: str, default: bool = False) -> bool:
    """true/false/1/0/yes/no."""
    raw = request.args.get(name)
    if raw is None:
        return default
    low = raw.lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise bad(name, "must be true or false")


def _filters() -> TraceFilter:
    flt = TraceFilter(
        instance_name=parse_str("instance_name"), status=parse_str("status", TRACE_STATUSES),
        user_id=parse_str("user_id"), min_duration=parse_int("min_duration", 0, 2**31 - 1),
        max_duration=parse_int("max_duration", 0, 2**31 - 1), start_date=parse_date("start_date"),
        end_date=parse_date("end_date"), failed_step=parse_str("failed_step", STEPS),
        message_type=parse_str("message_type"))
    return flt


def encode_cursor(row: dict) -> str:
    """Opaque cursor for the row after which the next page starts."""
    raw = json.dumps([row["created_at"].isoformat(), str(row["trace_id"])]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(token: str) -> tuple[dt.datetime, uuid.UUID]:
    """Inverse of encode_cursor; 400 on anything else."""
    try:
        if len(token) > 512:  # ours are under 120 characters; refuse to parse anything big
            raise ValueError("cursor too long")
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        at, tid = json.loads(raw)
        return dt.datetime.fromisoformat(at), uuid.UUID(tid)
    except (ValueError, TypeError, UnicodeDecodeError, RecursionError):
        raise bad("cursor", "not a cursor returned by this API") from None


def serialize(row: dict) -> dict:
    """A trace row as the API shows it."""
    out = dict(row)
    out["trace_id"] = str(row["trace_id"])
    for key in ("created_at", "updated_at", "platform_timestamp", "delivered_at", "read_at"):
        if row.get(key) is not None:
            out[key] = iso(row[key])
    return out


@bp.get("")
def list_traces():
    """Traces newest first, filtered, one page."""
    flt = _filters()
    limit = parse_int("limit", 1, 1000, 50) or 50
    cursor = request.args.get("cursor")
    after = decode_cursor(cursor) if cursor is not None else None
    rows = _store().list(flt, limit + 1, after)
    audit("list_traces", **{k: v for k, v in flt.__dict__.items() if v is not None and k != "user_id"})
    resp = jsonify([serialize(r) for r in rows[:limit]])
    if len(rows) > limit:
        token = encode_cursor(rows[limit - 1])
        args = {k: v for k, v in request.args.items() if k != "cursor"}
        args["cursor"] = token
        resp.headers["X-Next-Cursor"] = token
        resp.headers["Link"] = f'<{request.path}?{urlencode(args)}>; rel="next"'
    return resp


@bp.get("/analytics")
def get_analytics():
    """Counts, rates, percentiles and breakdowns over a period."""
    start, end = parse_date("start_date"), parse_date("end_date")
    interval = parse_str("interval", ANALYTICS_INTERVALS) or "day"
    top = parse_int("top", 1, 100, 10)
    instance = parse_str("instance_name")
    slow_ms = int(runtime().settings.slow_message_seconds * 1000)
    audit("trace_analytics", instance=instance)
    return jsonify(_store().analytics(start=start, end=end, instance=instance,
                                      interval=interval, top=top, slow_ms=slow_ms))


@bp.get("/<trace_id>")
def get_trace(trace_id: str):
    """One trace by id."""
    try:
        tid = uuid.UUID(trace_id)
    except ValueError:
        raise bad("trace_id", "not a UUID") from None
    row = _store().get(tid)
    if row is None:
        raise ApiError(404, f"trace {tid} not found")
    audit("get_trace", trace_id=str(tid), instance=row["instance_name"])
    return jsonify(serialize(row))


@bp.delete("")
def delete_traces():
    """Delete (or count, with dry_run) traces older than N days."""
    if "older_than_days" not in request.args:
        raise bad("older_than_days", "is required")
    days = parse_int("older_than_days", 0, 36500) or 0
    dry_run = parse_bool("dry_run")
    cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=days)
    store = _store()
    audit("delete_traces", older_than_days=days, dry_run=dry_run)
    if dry_run:
        return jsonify(would_delete=store.count_older_than(cutoff))
    return jsonify(deleted=store.delete_older_than(cutoff, exclusive=False))
