"""JSON logs on stdout (and to Loki): formatter, secret redaction, setup for app and gunicorn."""
from __future__ import annotations

import collections
import datetime as dt
import json
import logging
import os
import re
import sys
import threading
import time
import weakref
from typing import Any

from pythonjsonlogger.orjson import OrjsonFormatter

_QUERY_SECRET = re.compile(r"(?i)([?&](?:token|apikey|api_key|key)=)[^&\s\"]+")


class Redactor:
    """Replaces every registered secret value in a formatted line by ****."""

    def __init__(self) -> None:
        self._secrets: tuple[str, ...] = ()
        self._lock = threading.Lock()

    def add(self, *secrets: str | None) -> None:
        """Register secret values (short or empty ones are ignored: too easy to hit by chance)."""
        new = {s for s in secrets if s and len(s) >= 6} - set(self._secrets)
        if not new:
            return
        with self._lock:
            # Longest first so a secret containing another is replaced whole; one tuple
            # swap, so lines formatted meanwhile see the old or the new set, never half.
            self._secrets = tuple(sorted(set(self._secrets) | new, key=len, reverse=True))

    def __call__(self, line: str) -> str:
        line = _QUERY_SECRET.sub(r"\1****", line) if "=" in line else line
        # A substring test per secret (C speed) instead of one regex pass over every line:
        # most lines hold no secret, and this runs for each of them.
        for secret in self._secrets:
            if secret in line:
                line = line.replace(secret, "****")
        return line


REDACTOR = Redactor()

_second_prefix: tuple[int, str] = (-1, "")


def rfc3339(ts: float) -> str:
    """A Unix time as RFC 3339 UTC with milliseconds."""
    global _second_prefix
    sec = int(ts)
    cached = _second_prefix
    if cached[0] != sec:
        # Formatting the date once a second instead of per line (a datetime per line was a
        # tenth of the cost of a log line).
        cached = _second_prefix = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return f"{cached[1]}.{int((ts - sec) * 1000):03d}Z"


def _json_default(value: Any) -> Any:
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class OmniJsonFormatter(OrjsonFormatter):
    """One JSON object per record: timestamp, level, logger, message, event, then context.

    python-json-logger's orjson formatter, with the line built once per record (stdout and
    the Loki handler format the same record), secrets redacted and Z timestamps. Every
    record attribute that is not one of logging's own (the `extra` fields) is included.
    Measured on the service's step record: 11.3 us a line against 15.8 us for the
    hand-written json.dumps formatter it replaced (docs/performance.md).
    """

    def __init__(self) -> None:
        super().__init__(reserved_attrs=sorted(_RESERVED), json_default=_json_default)

    def format(self, record: logging.LogRecord) -> str:
        """The record's JSON line, redacted; cached on the record."""
        line = record.__dict__.get("_omni_line")
        if line is None:
            line = REDACTOR(super().format(record))
            record._omni_line = line
        return line

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord,
                   message_dict: dict[str, Any]) -> None:
        """The fixed fields first, then the record's extra fields."""
        log_data["timestamp"] = rfc3339(record.created)
        log_data["level"] = record.levelname
        log_data["logger"] = record.name
        log_data["message"] = record.message
        log_data["event"] = record.__dict__.get("event") or "log"
        super().add_fields(log_data, record, message_dict)

    def jsonify_log_record(self, log_data: dict[str, Any]) -> str:
        """orjson, or json where orjson refuses (integers over 64 bits, lone surrogates)."""
        try:
            return super().jsonify_log_record(log_data)
        except (TypeError, ValueError):  # orjson.JSONEncodeError is a TypeError
            return json.dumps(log_data, default=_json_default)


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


class StdoutHandler(logging.Handler):
    """JSON lines to stdout, written in batches by a background thread.

    emit() only formats the record and appends the line to a deque: no handler lock and
    no write per line. Under load a write (and flush) per record, with the GIL released
    during the syscall, made the request threads queue on the handler lock: a detailed-
    logging line cost ~95 us of worker CPU in the service against ~20 us alone (bench/).
    The price: lines reach stdout up to FLUSH_INTERVAL_S later, and a worker killed with
    SIGKILL loses at most that much; exit and logging.shutdown() write what is left.
    """

    FLUSH_INTERVAL_S = 0.1
    # If stdout stops draining (a stuck log collector), memory stays bounded and requests
    # go on; dropped lines are counted through on_drop.
    MAX_BUFFERED = 100_000

    def __init__(self, stream: Any = None, on_drop: Any = None) -> None:
        super().__init__()
        self.lock = None  # emit() appends to a deque (atomic): nothing to serialise
        self.stream = stream if stream is not None else sys.stdout
        self.on_drop = on_drop
        self._buf: collections.deque[str] = collections.deque()
        self._wake = threading.Event()
        self._closed = False
        self._reset()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=lambda ref=weakref.ref(self): _reset_in_child(ref))

    def _reset(self) -> None:
        # In a forked child: the parent writes what it had buffered; start empty.
        self._pid = os.getpid()
        self._buf.clear()
        self._thread: threading.Thread | None = None
        # Keeps batches in order between the thread and flush(); new after a fork, where the
        # parent's lock may have been held by a thread the child does not have.
        self._write_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        """Format the record and queue its line; never blocks on stdout."""
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - logging must not break the caller
            self.handleError(record)
            return
        if len(self._buf) >= self.MAX_BUFFERED:
            if self.on_drop is not None:
                try:
                    self.on_drop(1)
                except Exception:  # noqa: BLE001
                    pass
            return
        self._buf.append(line + "\n")
        if self._thread is None or self._pid != os.getpid():
            self._start()
        elif len(self._buf) >= 1000:
            self._wake.set()

    def _start(self) -> None:
        if self._pid != os.getpid():
            self._reset()
        with self._write_lock:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="omni-stdout", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.FLUSH_INTERVAL_S)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        """Write every queued line now."""
        with self._write_lock:
            buf = self._buf
            if not buf:
                return
            lines = [buf.popleft() for _ in range(len(buf))]
            try:
                self.stream.write("".join(lines))
                self.stream.flush()
            except (OSError, ValueError):  # stdout closed or gone: nothing better to do
                pass

    def close(self) -> None:
        """Write what is left and stop the thread."""
        self._closed = True
        self._wake.set()
        self.flush()
        super().close()


def _reset_in_child(ref: "weakref.ref[StdoutHandler]") -> None:
    handler = ref()
    if handler is not None:
        handler._reset()  # noqa: SLF001


def setup(level: str, loki_handler: logging.Handler | None = None, on_drop: Any = None) -> None:
    """Send every logger's records as JSON to stdout (and Loki when configured)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_omni", False):
            root.removeHandler(handler)
            if handler is not loki_handler:
                handler.close()
    stdout = StdoutHandler(sys.stdout, on_drop=on_drop)
    stdout.setFormatter(OmniJsonFormatter())
    stdout._omni = True  # type: ignore[attr-defined]
    root.addHandler(stdout)
    if loki_handler is not None:
        loki_handler.setFormatter(OmniJsonFormatter())
        loki_handler._omni = True  # type: ignore[attr-defined]
        root.addHandler(loki_handler)
    root.setLevel(level)
    # No line carries the caller's file, thread or process, so logging need not look them
    # up for every record (the Logging HOWTO's "Optimization"; ~25% of a log call).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # Libraries that would log request details (and so possibly credentials) at DEBUG.
    for noisy in ("urllib3", "aiohttp.access", "asyncio", "werkzeug"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLevelName(level)))
    # gunicorn's loggers write through the root handlers so they share the JSON format.
    for name in ("gunicorn.error", "gunicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers = []
        lg.propagate = True
