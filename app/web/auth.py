"""API key and token checks, failed-attempt limits and the security log (SPEC 4)."""
from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time

from flask import g, request

from app.db import DatabaseError, DatabaseUnavailable
from app.web.errors import ApiError
from app.web.ratelimit import WindowCounter
from app.telemetry.recorder import Recorder

log = logging.getLogger("omni.security")


def secret_equals(given: str | None, expected: str | None) -> bool:
    """Constant-time comparison (hmac.compare_digest on bytes); None never matches."""
    if given is None or expected is None:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"),
                               expected.encode("utf-8", "surrogateescape"))


def key_fingerprint(key: str) -> str:
    """A short, non-reversible name for a key, for access logs."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def client_ip() -> str:
    """The caller's address (ProxyFix rewrites it when proxies are trusted)."""
    return request.remote_addr or "unknown"


_SHARED_HIT = """
INSERT INTO auth_failure (address, window_start, failures)
VALUES (%(ip)s, date_trunc('minute', now()), 1)
ON CONFLICT (address, window_start) DO UPDATE SET failures = auth_failure.failures + 1
RETURNING failures, EXTRACT(EPOCH FROM date_trunc('minute', now()) + interval '1 minute' - now()) AS left_s"""
_SHARED_READ = """
SELECT failures, EXTRACT(EPOCH FROM date_trunc('minute', now()) + interval '1 minute' - now()) AS left_s
FROM auth_failure WHERE address = %(ip)s AND window_start = date_trunc('minute', now())"""
# How long a webhook sender's clean record is trusted before the shared table is read again.
SHARED_CLEAR_S = 1.0
_SHARED_PRUNE = "DELETE FROM auth_failure WHERE window_start < now() - interval '2 minutes'"


class Guard:
    """Checks credentials, counts and logs failures, blocks addresses that keep failing.

    Failures are counted in PostgreSQL (table auth_failure) so the limit holds across
    workers and replicas; when the database is unreachable each worker falls back to its
    own in-memory count.
    """

    def __init__(self, api_key: str, failures_per_minute: int, recorder: Recorder, db=None) -> None:
        self.api_key = api_key
        self.limit = failures_per_minute
        self.failures = WindowCounter(failures_per_minute)
        self.recorder = recorder
        self.db = db
        self._blocked_until: dict[str, float] = {}
        # Addresses the shared table showed clean, and until when that answer is reused.
        self._clear_until: dict[str, float] = {}

    def _shared(self, sql: str, ip: str) -> tuple[int, float] | None:
        if self.db is None:
            return None
        try:
            row = self.db.fetchone(sql, {"ip": ip})
        except (DatabaseUnavailable, DatabaseError):
            return None
        return (0, 60.0) if row is None else (int(row["failures"]), float(row["left_s"]))

    def _block(self, ip: str, seconds: float) -> None:
        if len(self._blocked_until) > 10_000:
            self._blocked_until.clear()
        self._blocked_until[ip] = time.monotonic() + seconds

    def fail(self, reason: str, status: int = 401, message: str = "missing or invalid API key",
             **fields) -> ApiError:
        """Count and log an authentication failure; return the error to raise."""
        ip = client_ip()
        self._count_failure(ip)
        self._log_failure(ip, reason, **fields)
        return ApiError(status, message)

    def _count_failure(self, ip: str) -> int:
        """Count one failure of ip; the failures of the current window, shared when possible."""
        local = self.failures.hit(ip)
        self._clear_until.pop(ip, None)
        shared = self._shared(_SHARED_HIT, ip)
        if shared is not None and shared[0] >= self.limit:
            self._block(ip, shared[1])
        return local if shared is None else shared[0]

    def _log_failure(self, ip: str, reason: str, **fields) -> None:
        self.recorder.auth_failed(reason)
        log.warning("authentication failed: %s", reason, extra={
            "event": "auth_failed", "reason": reason, "client_ip": ip, "path": request.path,
            "method": request.method, **fields})

    def _retry_after(self, ip: str, reuse_clear: bool = False) -> int | None:
        """Seconds until ip may try again, or None when it is not blocked."""
        now = time.monotonic()
        until = self._blocked_until.get(ip)
        if until is not None and until > now:
            return max(1, math.ceil(until - now))
        if self.failures.exceeded(ip):
            return self.failures.retry_after(ip)
        if reuse_clear and self._clear_until.get(ip, 0.0) > now:
            return None
        shared = self._shared(_SHARED_READ, ip)
        if shared is not None and shared[0] >= self.limit:
            self._block(ip, shared[1])
            return max(1, math.ceil(shared[1]))
        if shared is not None and reuse_clear:
            if len(self._clear_until) > 10_000:
                self._clear_until.clear()
            self._clear_until[ip] = now + SHARED_CLEAR_S
        return None

    def check_blocked(self) -> None:
        """429 for an address over its failed-attempt allowance, whatever it sends now."""
        ip = client_ip()
        wait = self._retry_after(ip)
        if wait is not None:
            raise self._limited(ip, wait)

    def require_webhook_secret(self, given: str | None, expected: str, **fields) -> None:
        """429 if the address is over its allowance, else 401 (counted) for a wrong secret.

        Shares the failed-attempt count of the API key, per client address, so guessing from
        one address never blocks the sender's own. The sender's webhooks are the hot path:
        a clean answer from the shared table is reused for SHARED_CLEAR_S, which is safe
        because every wrong guess is counted in the table and blocks the worker that saw it.
        """
        ip = client_ip()
        wait = self._retry_after(ip, reuse_clear=True)
        if wait is not None:
            raise self._limited(ip, wait)
        if secret_equals(given, expected):
            return
        failures = self._count_failure(ip)
        self._log_failure(ip, "missing_webhook_secret" if not given else "wrong_webhook_secret",
                          **fields)
        if failures > self.limit:
            # Another worker's failures filled the allowance since this one last looked.
            raise self._limited(ip, self._retry_after(ip) or 1)
        raise ApiError(401, "missing or invalid webhook secret")

    def _limited(self, ip: str, wait: int) -> ApiError:
        self.recorder.auth_failed("rate_limited")
        log.warning("rate limited after repeated authentication failures", extra={
            "event": "rate_limited", "reason": "auth_failures", "client_ip": ip, "path": request.path})
        return ApiError(429, "too many failed authentication attempts; retry later",
                        headers={"Retry-After": str(wait)})

    def prune(self) -> None:
        """Drop expired shared counters (periodic)."""
        if self.db is not None:
            self.db.execute(_SHARED_PRUNE)

    def require_api_key(self) -> None:
        """before_request of /api/v1: 429 if blocked, 401 if the key is missing or wrong."""
        self.check_blocked()
        given = request.headers.get("x-api-key")
        if not given:
            raise self.fail("missing_key")
        if not secret_equals(given, self.api_key):
            raise self.fail("wrong_key")
        g.key_id = key_fingerprint(given)

    def require_metrics_token(self, token: str) -> None:
        """Bearer token for /metrics when one is configured."""
        self.check_blocked()
        header = request.headers.get("Authorization", "")
        given = header[7:] if header[:7].lower() == "bearer " else None
        if not secret_equals(given, token):
            raise self.fail("metrics_token", message="missing or invalid bearer token")


def audit(action: str, **fields) -> None:
    """Log which key did what (instance changes, trace queries) for the security trail."""
    log.info("api access: %s", action, extra={
        "event": "api_access", "action": action, "key_id": g.get("key_id"),
        "client_ip": client_ip(), **fields})


def guard() -> Guard:
    """The app's Guard."""
    from app.runtime import runtime  # app.runtime builds the Guard: imported late

    return runtime().guard


