"""gunicorn's error and access logs in the service's JSON format (stdout, and Loki in workers)."""
from __future__ import annotations

from gunicorn.glogging import Logger

from app.telemetry.logs import AccessLogger, OmniJsonFormatter


class JsonLogger(Logger):
    """gunicorn Logger whose handlers write JSON lines and whose access lines carry fields."""

    def setup(self, cfg) -> None:
        """Install gunicorn's handlers, then give them the JSON formatter."""
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                handler.setFormatter(OmniJsonFormatter())

    def access(self, resp, req, environ, request_time) -> None:
        """One JSON line per request; probes (/health, /metrics) are not logged."""
        if not self.access_log_enabled or req.path in AccessLogger.SKIP_PATHS:
            return
        status = str(resp.status).split(None, 1)[0] if resp.status else "-"
        fields = AccessLogger.fields(req.method, req.path, req.query, status,
                                     request_time.total_seconds(),
                                     environ.get("REMOTE_ADDR", "-"), getattr(resp, "sent", None))
        self.access_log.info("%s %s %s", req.method, req.path, status, extra=fields)
