"""GET /health, GET /metrics and GET /openapi.json: the unauthenticated endpoints."""
from __future__ import annotations

import json
from pathlib import Path

from flask import Blueprint, Response, jsonify

from app.db import DatabaseError, DatabaseUnavailable
from app.web.errors import ApiError
from app.telemetry import metrics
from app.runtime import runtime

bp = Blueprint("health", __name__)
OPENAPI_PATH = Path(__file__).resolve().parent.parent / "openapi.json"


@bp.get("/health")
def health():
    """200 while the database answers, 503 otherwise (SPEC 4.1)."""
    rt = runtime()
    s = rt.settings
    try:
        rt.db.ping()
        database = "ok"
    except (DatabaseUnavailable, DatabaseError) as exc:
        database = f"error: {exc}"[:200]
    loki = rt.loki.status() if rt.loki is not None else "disabled"
    ok = database == "ok"
    body = {"status": "ok" if ok else "degraded", "tracing_enabled": s.enable_tracing,
            "trace_retention_days": s.trace_retention_days, "metrics_enabled": s.enable_metrics,
            "detailed_logging": s.enable_detailed_logging, "version": rt.version,
            "checks": {"database": database, "loki": loki}}
    return jsonify(body), 200 if ok else 503


@bp.get("/metrics")
def prometheus_metrics():
    """Prometheus exposition summed over every worker (404 when metrics are off)."""
    rt = runtime()
    if not rt.settings.enable_metrics:
        raise ApiError(404, "metrics are disabled")
    if rt.settings.metrics_token:
        rt.guard.require_metrics_token(rt.settings.metrics_token)
    payload, content_type = metrics.exposition()
    return Response(payload, content_type=content_type)


_openapi_cache: dict = {}


@bp.get("/openapi.json")
def openapi():
    """The OpenAPI document kept in the repository."""
    if "doc" not in _openapi_cache:
        _openapi_cache["doc"] = json.loads(OPENAPI_PATH.read_text())
    return jsonify(_openapi_cache["doc"])
