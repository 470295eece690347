"""The gateway's words, in one place: steps, statuses, reasons and the timestamp format.

Metrics seed their series from these tuples, the store and analytics build their SQL from
them, the trace API validates filters against them, app/openapi.json's enums are checked
against them (tests/unit/test_vocabulary.py), and the tests and the bench import them.
Adding a processing step starts here.
"""
from __future__ import annotations

import datetime as dt

# The processing steps of a message, in the order they run (trace `steps`, metric `step`).
STEPS = ("webhook_received", "instance_validated", "agent_called", "evolution_send")
# The steps the webhook records before answering; the pipeline runs the rest.
INTAKE_STEPS = STEPS[:2]

# A step's status in a trace; only success and failed carry a duration, so only they are
# metric label values.
STEP_STATUSES = ("success", "failed", "skipped")
STEP_OUTCOMES = ("success", "failed")

# A trace's status: processing until the pipeline (or recovery) writes a final one.
TRACE_STATUSES = ("processing", "completed", "failed", "error")
FINAL_STATUSES = TRACE_STATUSES[1:]

# Why a webhook was answered 200 `ignored` (omni_webhook_ignored_total{reason}).
IGNORE_REASONS = (
    "event",            # an event other than messages.upsert / messages.update
    "from_me",          # sent by the instance itself (our replies, the operator's phone)
    "group",            # @g.us
    "broadcast",        # status@broadcast, broadcast lists, channels (@newsletter)
    "unsupported_jid",  # an address that is no WhatsApp user, group or broadcast
    "list_data",        # `data` is a list (contacts.update, chats.upsert ...)
    "no_message",       # `message` null or empty (stubs, undecryptable messages)
    "no_text",          # media without a caption, locations, contacts, polls ...
    "audio",            # voice notes and audio files
    "sticker",
    "reaction",
    "edited",
    "revoked",          # "delete for everyone"
    "protocol",         # other protocol messages (disappearing-mode changes, key shares)
    "receipt",          # a messages.update that is no delivery or read receipt of a sent message
    "receipt_unknown",  # a receipt for a message this gateway did not send (counted later)
)

# Why a webhook was refused with a 4xx or 503 (omni_webhook_rejected_total{reason}).
REJECT_REASONS = (
    "unknown_instance", "disabled_instance", "bad_secret", "malformed", "too_large",
    "database_unavailable", "overloaded", "rate_limited",
)

# Why an authentication failed (omni_auth_failures_total{reason}).
AUTH_REASONS = ("missing_key", "wrong_key", "missing_webhook_secret", "wrong_webhook_secret",
                "rate_limited", "metrics_token")

# How a call to a dependency failed (omni_upstream_errors_total{upstream, reason}).
UPSTREAM_REASONS = {
    "agent": ("timeout", "connection", "http_3xx", "http_4xx", "http_5xx", "bad_response"),
    "evolution": ("timeout", "connection", "http_3xx", "http_4xx", "http_5xx"),
    "database": ("unavailable", "write_failed"),
    "loki": ("connection", "http_4xx", "http_5xx", "timeout"),  # drops: omni_log_records_dropped_total
}

# How a canary run ended (omni_canary_runs_total{result}): completed within the slow-message
# threshold, completed later, or anything else.
CANARY_RESULTS = ("ok", "slow", "failed")
# Receipts of a sent reply (omni_reply_receipt_seconds{status}).
RECEIPT_STATUSES = ("delivered", "read")
# Token types the agent reports (omni_agent_tokens_total{type}).
TOKEN_TYPES = ("input", "output")
# Buckets of the analytics volume series.
ANALYTICS_INTERVALS = ("hour", "day", "week", "month")


def sql_list(values: tuple[str, ...]) -> str:
    """A tuple of vocabulary words as an SQL list literal: ('a', 'b')."""
    assert all(v.isidentifier() for v in values), values  # our own words only, never input
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"


def utcnow() -> dt.datetime:
    """Timezone-aware now in UTC."""
    return dt.datetime.now(dt.timezone.utc)


def iso(ts: dt.datetime, timespec: str = "milliseconds") -> str:
    """RFC 3339 in UTC with a Z: the one timestamp format of the API, traces and logs."""
    return ts.astimezone(dt.timezone.utc).isoformat(timespec=timespec).replace("+00:00", "Z")
