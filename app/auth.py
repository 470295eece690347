"""API key and token checks, failed-attempt limits and the security log (SPEC 4, issue 6)."""
from __future__ import annotations

import hashlib
import hmac
import logging

from flask import current_app, g, request

from app.errors import ApiError
from app.ratelimit import WindowCounter
from app.telemetry import metrics

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


class Guard:
    """Checks credentials, counts and logs failures, blocks addresses that keep failing."""

    def __init__(self, api_key: str, failures_per_minute: int, metrics_on: bool) -> None:
        self.api_key = api_key
        self.failures = WindowCounter(failures_per_minute)
        self.metrics_on = metrics_on

    def fail(self, reason: str, status: int = 401, message: str = "missing or invalid API key",
             **fields) -> ApiError:
        """Count and log an authentication failure; return the error to raise."""
        ip = client_ip()
        self.failures.hit(ip)
        if self.metrics_on:
            metrics.AUTH_FAILURES.labels(reason=reason).inc()
        log.warning("authentication failed: %s", reason, extra={
            "event": "auth_failed", "reason": reason, "client_ip": ip, "path": request.path,
            "method": request.method, **fields})
        return ApiError(status, message)

    def check_blocked(self) -> None:
        """429 for an address over its failed-attempt allowance, whatever it sends now."""
        ip = client_ip()
        if self.failures.exceeded(ip):
            if self.metrics_on:
                metrics.AUTH_FAILURES.labels(reason="rate_limited").inc()
            log.warning("rate limited after repeated authentication failures", extra={
                "event": "rate_limited", "reason": "auth_failures", "client_ip": ip, "path": request.path})
            raise ApiError(429, "too many failed authentication attempts; retry later",
                           headers={"Retry-After": str(self.failures.retry_after(ip))})

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
    return current_app.extensions["omni"].guard


