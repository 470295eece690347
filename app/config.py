"""Service configuration: one frozen Settings, read only from AUTOMAGIK_OMNI_* variables."""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import Mapping
from urllib.parse import urlparse

PREFIX = "AUTOMAGIK_OMNI_"
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# app.instances.NAME_RE, restated: importing app.instances would load the database driver.
_INSTANCE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment (SPEC section 3)."""

    api_key: str
    database_url: str = "postgresql://omni:omni@localhost:5432/omni"
    host: str = "0.0.0.0"
    port: int = 8882
    workers: int = 2
    threads: int = 16
    enable_tracing: bool = True
    trace_retention_days: int = 30
    log_level: str = "INFO"
    enable_metrics: bool = True
    enable_detailed_logging: bool = True
    loki_url: str | None = None
    slow_message_seconds: float = 10.0
    store_message_content: bool = True
    log_message_content: bool = False
    # Beyond SPEC 3: operational limits an operator may need to tune.
    env: str = "dev"
    max_in_flight: int = 2000
    overload_wait_s: float = 1.0
    metrics_token: str | None = None
    evolution_timeout_s: float = 15.0
    auth_failures_per_minute: int = 10
    webhook_rate_per_instance: int = 0
    webhook_rate_per_address: int = 0
    db_pool_size: int = 8
    purge_interval_s: float = 3600.0
    sweep_interval_s: float = 60.0
    shutdown_grace_s: float = 20.0
    trusted_proxies: int = 0
    # Budget of the omni-cost-burn alert (USD per day), exported as a gauge so the alert
    # rules can read it: Grafana does not interpolate the environment in alert queries.
    # 0: no budget, the alert is off.
    cost_alert_usd_per_day: float = 0.0
    # The canary (app/canary.py): the instance it messages (unset: no canary), how often, the
    # base URL its webhook goes to (unset: this service's own port on 127.0.0.1; set it to the
    # address Evolution uses to cover the proxy too) and the WhatsApp number it poses as.
    canary_instance: str | None = None
    canary_interval_s: float = 60.0
    canary_url: str | None = None
    canary_number: str = "15555550100"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *,
                 require_api_key: bool = True) -> "Settings":
        """Build Settings from the environment; raise ConfigError naming the bad variable."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for field in dataclasses.fields(cls):
            name = PREFIX + field.name.upper()
            raw = read_variable(env, name)
            if raw is None or (raw.strip() == "" and field.name != "api_key"):
                continue
            values[field.name] = _parse(name, field.type, raw.strip())
        if not values.get("api_key") and not require_api_key:
            values["api_key"] = "unused-by-admin-commands"
        if not values.get("api_key"):
            raise ConfigError(f"{PREFIX}API_KEY is required: set it to the value clients send "
                              "in the x-api-key header")
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        """Check ranges and formats; raise ConfigError naming the variable."""
        def bad(field: str, why: str) -> ConfigError:
            return ConfigError(f"{PREFIX}{field.upper()}: {why}")

        if len(self.api_key) < 8:
            raise bad("api_key", "must be at least 8 characters")
        if urlparse(self.database_url).scheme not in ("postgresql", "postgres"):
            raise bad("database_url", "must be a postgresql:// URL")
        if not 1 <= self.port <= 65535:
            raise bad("port", f"{self.port} is not a TCP port (1-65535)")
        if not 1 <= self.workers <= 64:
            raise bad("workers", "must be between 1 and 64")
        if not 1 <= self.threads <= 256:
            raise bad("threads", "must be between 1 and 256")
        if not 1 <= self.trace_retention_days <= 36500:
            raise bad("trace_retention_days", "must be between 1 and 36500")
        if self.log_level not in LOG_LEVELS:
            raise bad("log_level", f"must be one of {', '.join(LOG_LEVELS)}")
        if self.loki_url is not None and (urlparse(self.loki_url).scheme not in ("http", "https")
                                          or not urlparse(self.loki_url).hostname):
            raise bad("loki_url", "must be an http:// or https:// URL with a host")
        for name in ("slow_message_seconds", "evolution_timeout_s", "purge_interval_s",
                     "sweep_interval_s", "shutdown_grace_s"):
            if getattr(self, name) <= 0:
                raise bad(name, "must be greater than 0")
        for name in ("max_in_flight", "auth_failures_per_minute", "db_pool_size"):
            if getattr(self, name) < 1:
                raise bad(name, "must be at least 1")
        if self.cost_alert_usd_per_day < 0:
            raise bad("cost_alert_usd_per_day", "must be 0 (no cost alert) or more")
        if self.overload_wait_s < 0:
            raise bad("overload_wait_s", "must be 0 (answer 503 at once) or more")
        for name in ("webhook_rate_per_instance", "webhook_rate_per_address", "trusted_proxies"):
            if getattr(self, name) < 0:
                raise bad(name, "must be 0 (unlimited) or more")
        self._validate_canary(bad)

    def _validate_canary(self, bad) -> None:
        if self.canary_instance is not None and not _INSTANCE_NAME.match(self.canary_instance):
            raise bad("canary_instance", "must be an instance name (a-z, 0-9, _ and -, "
                      "starting with a letter or digit, at most 63 characters)")
        # Below a second the lease's claims would dominate the database's work.
        if not self.canary_interval_s >= 1:
            raise bad("canary_interval_s", "must be at least 1 (seconds)")
        if self.canary_url is not None and (urlparse(self.canary_url).scheme not in ("http", "https")
                                            or not urlparse(self.canary_url).hostname):
            raise bad("canary_url", "must be an http:// or https:// URL with a host")
        if not re.fullmatch(r"[0-9]{5,20}", self.canary_number):
            raise bad("canary_number", "must be the digits of a phone number (5 to 20)")
        if self.canary_instance is not None and not self.enable_tracing:
            raise bad("canary_instance", "the canary follows the trace of its message: "
                      f"set {PREFIX}ENABLE_TRACING=true or unset {PREFIX}CANARY_INSTANCE")

    def public(self) -> dict:
        """The settings with every secret masked, for logs and diagnostics."""
        data = dataclasses.asdict(self)
        for secret in ("api_key", "metrics_token"):
            if data[secret]:
                data[secret] = "****"
        parsed = urlparse(self.database_url)
        if parsed.password:
            data["database_url"] = self.database_url.replace(f":{parsed.password}@", ":****@", 1)
        # libpq also accepts the password as a query parameter.
        data["database_url"] = re.sub(r"([?&]password=)[^&#]*", r"\1****", data["database_url"])
        return data


def read_variable(env: Mapping[str, str], name: str) -> str | None:
    """The value of `name`, or the content of the file named by `name`_FILE.

    Secrets reach containers as files (Docker secrets, /run/secrets/...) rather than as
    environment values that `docker inspect` shows: AUTOMAGIK_OMNI_API_KEY_FILE=/run/secrets/x
    reads the API key from that file. One trailing newline (what `echo` and editors add) is
    removed. Setting both forms is an error: which one wins would be a guess."""
    file_name = name + "_FILE"
    path = env.get(file_name)
    if path is None:
        return env.get(name)
    if name in env:
        raise ConfigError(f"{name} and {file_name} are both set: set only one of them")
    if not path.strip():
        raise ConfigError(f"{file_name} is empty: set it to the path of a file holding {name}")
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read()
    except OSError as exc:
        raise ConfigError(f"{file_name}: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{file_name}: {path} is not UTF-8 text") from None
    if value.endswith("\r\n"):
        return value[:-2]
    return value[:-1] if value.endswith("\n") else value


def _parse(name: str, kind: object, raw: str) -> object:
    kind = str(kind)
    if kind == "bool":
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{name}: {raw!r} is not a boolean (use true/false, 1/0, yes/no)")
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{name}: {raw!r} is not a whole number") from None
    if kind == "float":
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name}: {raw!r} is not a number") from None
        if not math.isfinite(value):
            raise ConfigError(f"{name}: {raw!r} is not a finite number")
        return value
    if name.endswith("LOG_LEVEL"):
        return raw.upper()
    return raw
