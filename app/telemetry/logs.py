"""JSON logs on stdout (and to Loki): formatter, secret redaction, setup for app and gunicorn."""
from __future__ import annotations

import datetime as dt
import logging
import re
import sys
import threading
from typing import Any

from pythonjsonlogger.json import JsonFormatter

# Fields SPEC 5 names, in a stable order after the fixed ones.
CONTEXT_FIELDS = ("trace_id", "instance", "user_id", "step", "status", "duration_ms", "error")
_QUERY_SECRET = re.compile(r"(?i)([?&](?:token|apikey|api_key|key)=)[^&\s\"]+")


class Redactor:
    """Replaces every registered secret value in a formatted line by ****."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self._pattern: re.Pattern | None = None
        self._lock = threading.Lock()

    def add(self, *secrets: str | None) -> None:
        """Register secret values (short or empty ones are ignored: too easy to hit by chance)."""
        new = {s for s in secrets if s and len(s) >= 6} - self._secrets
        if not new:
            return
        with self._lock:
            self._secrets |= new
            # Longest first so a secret containing another is replaced whole.
            ordered = sorted(self._secrets, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(s) for s in ordered))

    def __call__(self, line: str) -> str:
        line = _QUERY_SECRET.sub(r"\1****", line) if "=" in line else line
        pattern = self._pattern
        return pattern.sub("****", line) if pattern is not None else line


REDACTOR = Redactor()


def rfc3339(ts: float) -> str:
    """A Unix time as RFC 3339 UTC with milliseconds."""
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


class OmniJsonFormatter(JsonFormatter):
    """One JSON object per record: timestamp, level, logger, message, event, then context."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("reserved_attrs", _RESERVED)
        super().__init__(*args, **kwargs)

    def add_fields(self, log_data: dict, record: logging.LogRecord, message_dict: dict) -> None:
        log_data["timestamp"] = rfc3339(record.created)
        log_data["level"] = record.levelname
        log_data["logger"] = record.name
        log_data["message"] = record.message
        log_data["event"] = getattr(record, "event", None) or "log"
        super().add_fields(log_data, record, message_dict)
        if record.exc_info and "exc_info" not in log_data:
            log_data["exc_info"] = self.formatException(record.exc_info)

    def format(self, record: logging.LogRecord) -> str:
        # stdout and the Loki handler format the same record with the same formatter:
        # build the JSON line once per record (half the logging CPU with Loki on).
        line = record.__dict__.get("_omni_line")
        if line is None:
            line = REDACTOR(super().format(record))
            record._omni_line = line  # type: ignore[attr-defined]
        return line


_RESERVED = set(logging.LogRecord("x", 0, "", 0, "", None, None).__dict__) | {"message", "asctime",
                                                                               "taskName", "event",
                                                                               "_omni_line"}


class AccessLogger:
    """Builds gunicorn's access log line as JSON fields (used by app.gunicorn.conf)."""

    SKIP_PATHS = ("/health", "/metrics")

    @staticmethod
    def fields(method: str, path: str, query: str, status: str, duration_s: float,
               remote: str, size: Any) -> dict:
        """The extra fields of one access line."""
        return {"event": "http_access", "method": method, "path": path,
                "query": _QUERY_SECRET.sub(r"\1****", "?" + query)[1:] if query else "",
                "status": status, "duration_ms": round(duration_s * 1000, 2),
                "client_ip": remote, "bytes": size}


def setup(level: str, loki_handler: logging.Handler | None = None) -> None:
    """Send every logger's records as JSON to stdout (and Loki when configured)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_omni", False):
            root.removeHandler(handler)
            if handler is not loki_handler:
                handler.close()
    stdout = logging.StreamHandler(sys.stdout)
    stdout.setFormatter(OmniJsonFormatter())
    stdout._omni = True  # type: ignore[attr-defined]
    root.addHandler(stdout)
    if loki_handler is not None:
        loki_handler.setFormatter(OmniJsonFormatter())
        loki_handler._omni = True  # type: ignore[attr-defined]
        root.addHandler(loki_handler)
    root.setLevel(level)
    # Libraries that would log request details (and so possibly credentials) at DEBUG.
    for noisy in ("urllib3", "aiohttp.access", "asyncio", "werkzeug"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLevelName(level)))
    # gunicorn's loggers write through the root handlers so they share the JSON format.
    for name in ("gunicorn.error", "gunicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers = []
        lg.propagate = True
