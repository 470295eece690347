"""omni: the AI-agent messaging gateway with full telemetry. `create_app()` builds the service."""
from __future__ import annotations

import atexit
import logging
import time

from flask import Flask, g, request
from werkzeug.middleware.proxy_fix import ProxyFix

from app import runtime
from app.web import errors
from app.config import Settings
from app.web.jsonsafe import StrictJSONProvider
from app.telemetry import logs
from app.telemetry.recorder import NullRecorder, Recorder, recorder_for
from app.version import __version__

log = logging.getLogger("omni")
MAX_BODY_BYTES = 1 << 20
# Any other method string becomes "other" so clients cannot create label values.
_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}


def _make_loki(settings: Settings, recorder: Recorder):
    if not settings.loki_url:
        return None
    from app.telemetry.loki import LokiHandler

    return LokiHandler(settings.loki_url, {"service": "omni", "env": settings.env},
                       on_drop=recorder.log_records_dropped,
                       on_error=lambda reason: recorder.upstream_failed("loki", reason))


def create_app(settings: Settings | None = None) -> Flask:
    """Build the Flask app and start this worker's background threads."""
    settings = settings or Settings.from_env()
    recorder = recorder_for(settings.enable_metrics)
    loki = _make_loki(settings, recorder)
    logs.setup(settings.log_level, loki, on_drop=recorder.log_records_dropped)
    logs.REDACTOR.add(settings.api_key, settings.metrics_token)

    app = Flask(__name__)
    app.json = StrictJSONProvider(app)  # 400, not 500, for non-UTF-8, lone surrogates, deep nesting
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False
    if settings.trusted_proxies:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxies)  # type: ignore[method-assign]

    rt = runtime.build(settings, recorder, loki)
    app.extensions["omni"] = rt
    rt.recorder.started(__version__, settings.cost_alert_usd_per_day)
    rt.recorder.canary_configured(settings.canary_interval_s if settings.canary_instance else None)

    errors.register(app)
    from app.web.health import bp as health_bp
    from app.instances.api import bp as instances_bp
    from app.traces.api import bp as traces_bp
    from app.web.webhooks import bp as webhooks_bp

    for bp in (health_bp, webhooks_bp, instances_bp, traces_bp):
        app.register_blueprint(bp)
    _install_http_metrics(app, rt.recorder)

    rt.start()
    atexit.register(rt.shutdown)
    log.info("worker started", extra={"event": "worker_started", "settings": settings.public()})
    return app


def _install_http_metrics(app: Flask, recorder: Recorder) -> None:
    if isinstance(recorder, NullRecorder):
        return  # not even the timer
    @app.before_request
    def _start_timer() -> None:
        g.t0 = time.perf_counter()

    @app.after_request
    def _observe(response):
        t0 = g.get("t0")
        if t0 is not None:
            route = request.url_rule.rule if request.url_rule is not None else "unmatched"
            method = request.method if request.method in _METHODS else "other"
            recorder.http_request(method, route, response.status_code, time.perf_counter() - t0)
        return response


__all__ = ["create_app", "Settings"]
