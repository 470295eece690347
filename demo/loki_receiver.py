"""A strict in-process stand-in for Loki's push endpoint, for handler and integration tests.

It validates pushes the way Loki's distributor/ingester do with default limits and
answers 400 (recording the reason in `.errors`) for anything Loki would refuse, so a
client cannot pass tests while sending a format the real Loki rejects.

    rx = LokiReceiver().start()
    ... point the service at rx.url ...
    assert rx.errors == [] and rx.lines()[0]["message"] == "hello"
    rx.stop()
"""
from __future__ import annotations

import gzip
import json
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

PUSH_PATH = "/loki/api/v1/push"
MAX_LINE_BYTES = 256_000          # Loki max_line_size default "256KB"
MAX_LABELS = 15                   # Loki max_label_names_per_series default
MAX_LABEL_VALUE = 2048            # Loki max_label_value_length default
MAX_LABEL_NAME = 1024             # Loki max_label_name_length default
FUTURE_GRACE_NS = 10 * 60 * 10**9  # Loki creation_grace_period default (10m)
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
_TS = re.compile(r"[0-9]+\Z")
MODES = ("ok", "500", "429", "400", "slow")


class _Invalid(Exception):
    """A push Loki would refuse with 400."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        # A client hanging up mid-request (a worker killed while pushing) is not a receiver
        # fault worth a traceback; anything else still prints one.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class LokiReceiver:
    """Loki push endpoint on 127.0.0.1 that records accepted entries and format errors."""

    def __init__(self, port: int = 0, *, unordered: bool = False):
        # unordered=True mimics Loki's unordered_writes (default on in real Loki) for tests
        # where several processes share one stream; the strict default catches ordering bugs.
        self.port = port
        self.unordered = unordered
        self.entries: list[tuple[dict, int, str, dict]] = []
        self.errors: list[str] = []
        self.pushes: list[dict] = []   # every push request: time, status, headers, count
        self.requests = 0
        self.duplicates = 0
        self._newest: dict[tuple, int] = {}
        self._seen: set[tuple] = set()
        self._mode = "ok"
        self._delay = 5.0
        self._lock = threading.Lock()
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None

    # ---------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        """Base URL to give the client (it appends /loki/api/v1/push)."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "LokiReceiver":
        """Start serving in a daemon thread; returns self."""
        handler = type("_BoundHandler", (_PushHandler,), {"receiver": self})
        self._server = _Server(("127.0.0.1", self.port), handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and free the port; safe to call twice."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def down(self) -> None:
        """Simulate Loki being unreachable (connections refused)."""
        self.stop()

    def up(self) -> None:
        """Serve again on the same port after down()."""
        if self._server is None:
            self.start()

    def set_mode(self, mode: str, delay: float = 5.0) -> None:
        """Answer pushes normally ('ok'), with 500, 429 (Retry-After: 1), 400, or after a delay ('slow')."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        with self._lock:
            self._mode = mode
            self._delay = delay

    def __enter__(self) -> "LokiReceiver":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- helpers for tests

    def lines(self) -> list:
        """Parsed JSON of every accepted line, in arrival order."""
        with self._lock:
            return [json.loads(line) for _, _, line, _ in self.entries]

    def wait_for(self, count: int, timeout: float = 5.0) -> bool:
        """Wait until at least `count` entries were accepted."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.entries) >= count:
                return True
            time.sleep(0.01)
        return len(self.entries) >= count

    def reset(self) -> None:
        """Forget everything received (but keep serving)."""
        with self._lock:
            self.entries.clear()
            self.errors.clear()
            self.pushes.clear()
            self.requests = 0
            self.duplicates = 0
            self._newest.clear()
            self._seen.clear()

    # ---------------------------------------------------------------- request handling

    def _mode_now(self) -> tuple[str, float]:
        with self._lock:
            self.requests += 1
            return self._mode, self._delay

    def _reject(self, reason: str) -> tuple[int, str]:
        with self._lock:
            self.errors.append(reason)
        return 400, reason

    def _accept(self, headers, body: bytes) -> tuple[int, str]:
        """Validate a push and store its entries; (status, reason)."""
        try:
            payload = _decode(headers, body)
            streams = _parse_streams(payload)
        except _Invalid as exc:
            return self._reject(str(exc))
        with self._lock:
            try:
                self._check_order(streams)
            except _Invalid as exc:
                self.errors.append(str(exc))
                return 400, str(exc)
            self._store(streams)
        return 204, ""

    def _check_order(self, streams: list[tuple[dict, list]]) -> None:
        newest = dict(self._newest)
        for labels, values in streams:
            key = tuple(sorted(labels.items()))
            for ts, _, _ in values:
                if not self.unordered and ts < newest.get(key, 0):
                    raise _Invalid(f"entry out of order: timestamp {ts} for stream {labels} "
                                   f"older than {newest[key]}")
                newest[key] = max(ts, newest.get(key, 0))

    def _store(self, streams: list[tuple[dict, list]]) -> None:
        for labels, values in streams:
            key = tuple(sorted(labels.items()))
            for ts, line, meta in values:
                # Loki silently drops an entry identical (timestamp and line) to a stored one.
                if (key, ts, line) in self._seen:
                    self.duplicates += 1
                    continue
                self._seen.add((key, ts, line))
                self._newest[key] = max(ts, self._newest.get(key, 0))
                self.entries.append((dict(labels), ts, line, meta))


def _decode(headers, body: bytes):
    ctype = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise _Invalid(f"unsupported Content-Type {ctype!r} (only application/json accepted here)")
    encoding = (headers.get("Content-Encoding") or "").strip().lower()
    if encoding == "gzip":
        try:
            body = gzip.decompress(body)
        except (OSError, EOFError) as exc:
            raise _Invalid(f"bad gzip body: {exc}") from exc
    elif encoding not in ("", "identity"):
        raise _Invalid(f"unsupported Content-Encoding {encoding!r}")
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _Invalid(f"body is not JSON: {exc}") from exc


def _parse_streams(payload) -> list[tuple[dict, list]]:
    if not isinstance(payload, dict) or not isinstance(payload.get("streams"), list):
        raise _Invalid('body must be {"streams": [...]}')
    return [_parse_stream(s) for s in payload["streams"]]


def _parse_stream(stream) -> tuple[dict, list]:
    if not isinstance(stream, dict):
        raise _Invalid("each stream must be an object")
    labels = stream.get("stream")
    _check_labels(labels)
    values = stream.get("values")
    if not isinstance(values, list) or not values:
        raise _Invalid(f"stream {labels} needs a non-empty 'values' list")
    parsed = [_parse_value(v) for v in values]
    for prev, cur in zip(parsed, parsed[1:]):
        if cur[0] < prev[0]:
            raise _Invalid(f"entry out of order within stream {labels}: {cur[0]} after {prev[0]}")
    return labels, parsed


def _check_labels(labels) -> None:
    if not isinstance(labels, dict) or not labels:
        raise _Invalid("'stream' must be a non-empty object of labels")
    if len(labels) > MAX_LABELS:
        raise _Invalid(f"stream has {len(labels)} labels, limit is {MAX_LABELS}")
    for name, value in labels.items():
        if not _LABEL_NAME.match(name) or name.startswith("__") or len(name) > MAX_LABEL_NAME:
            raise _Invalid(f"invalid label name {name!r}")
        if not isinstance(value, str) or not value or len(value) > MAX_LABEL_VALUE:
            raise _Invalid(f"label {name!r} value must be a non-empty string, got {value!r}")


def _parse_value(value) -> tuple[int, str, dict]:
    if not isinstance(value, list) or len(value) not in (2, 3):
        raise _Invalid(f"value must be [ts, line] or [ts, line, metadata], got {value!r:.200}")
    ts, line = value[0], value[1]
    if not isinstance(ts, str) or not _TS.match(ts):
        raise _Invalid(f"timestamp must be a string of decimal nanoseconds, got {ts!r}")
    ts_ns = int(ts)
    if ts_ns > time.time_ns() + FUTURE_GRACE_NS:
        raise _Invalid(f"timestamp {ts} too far in the future")
    if not isinstance(line, str):
        raise _Invalid(f"line must be a string, got {type(line).__name__}")
    if len(line.encode("utf-8")) > MAX_LINE_BYTES:
        raise _Invalid(f"line too long ({len(line.encode('utf-8'))} bytes > {MAX_LINE_BYTES})")
    meta = value[2] if len(value) == 3 else {}
    if not isinstance(meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _Invalid(f"structured metadata must be an object of strings, got {meta!r:.200}")
    return ts_ns, line, meta


class _PushHandler(BaseHTTPRequestHandler):
    receiver: LokiReceiver
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep test output clean
        pass

    def do_POST(self):
        rx = self.receiver
        body = self._read_body()
        if self.path.split("?")[0] != PUSH_PATH:
            rx._reject(f"POST to unknown path {self.path}")
            return self._answer(404, "not found")
        mode, delay = rx._mode_now()
        if mode == "slow":
            time.sleep(delay)
            mode = "ok"
        if mode == "ok":
            status, reason = rx._accept(self.headers, body) if body is not None \
                else rx._reject("missing or bad Content-Length")
        else:
            status, reason = {"500": (500, "injected failure"), "429": (429, "rate limited"),
                              "400": (400, "injected rejection")}[mode]
        self._log_push(status)
        self._answer(status, reason, {"Retry-After": "1"} if status == 429 else None)

    def do_GET(self):
        self._wrong_method()

    do_PUT = do_DELETE = do_PATCH = do_GET

    def _wrong_method(self):
        self.receiver._reject(f"{self.command} {self.path}: only POST {PUSH_PATH} is supported")
        self._answer(405, "method not allowed")

    def _read_body(self) -> Optional[bytes]:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            return None
        return self.rfile.read(length)

    def _log_push(self, status: int) -> None:
        rx = self.receiver
        with rx._lock:
            rx.pushes.append({"time": time.monotonic(), "status": status,
                              "encoding": self.headers.get("Content-Encoding"),
                              "content_type": self.headers.get("Content-Type")})

    def _answer(self, status: int, reason: str, headers: Optional[dict] = None) -> None:
        data = (reason + "\n").encode() if reason else b""
        try:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if data:
                self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout); nothing to answer
