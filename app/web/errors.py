"""JSON error bodies for every failure: never an HTML page, never a stack trace (SPEC 4)."""
from __future__ import annotations

import logging

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from app.db import DatabaseUnavailable

log = logging.getLogger("omni.http")


class ApiError(Exception):
    """An error answer with a status, a human-readable message and optional detail."""

    def __init__(self, status: int, message: str, detail: dict | None = None,
                 headers: dict | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = detail
        self.headers = headers or {}


def error_response(status: int, message: str, detail: dict | None = None, headers: dict | None = None):
    """A Flask response carrying {"error", "detail"?}."""
    body: dict = {"error": message}
    if detail:
        body["detail"] = detail
    resp = jsonify(body)
    resp.status_code = status
    for key, value in (headers or {}).items():
        resp.headers[key] = value
    return resp


_MESSAGES = {
    400: "bad request", 404: "not found", 405: "method not allowed",
    413: "request body too large (limit 1 MiB)", 415: "unsupported content type",
    431: "request headers too large",
}


def register(app: Flask) -> None:
    """Install the JSON error handlers."""

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        return error_response(exc.status, exc.message, exc.detail, exc.headers)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        code = exc.code or 500
        allowed = getattr(exc, "valid_methods", None)  # MethodNotAllowed only
        headers = {"Allow": ", ".join(allowed)} if allowed else None
        return error_response(code, _MESSAGES.get(code, exc.name.lower()), headers=headers)

    @app.errorhandler(DatabaseUnavailable)
    def _db_down(exc: DatabaseUnavailable):
        log.error("database unavailable", extra={"event": "database_unavailable", "error": str(exc)})
        return error_response(503, "database unavailable; retry later", headers={"Retry-After": "5"})

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error", extra={"event": "unhandled_error"})
        return error_response(500, "internal error")
