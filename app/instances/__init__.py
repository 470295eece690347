"""Instances: validation, storage and a short-lived per-worker cache for the webhook path."""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable
from urllib.parse import urlparse

from app.db import Database, UniqueViolation
from app.vocabulary import iso

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
AGENT_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
SECRET_FIELDS = ("agent_api_key", "evolution_api_key", "webhook_secret")
COLUMNS = """id, name, agent_api_url, agent_api_key, agent_name, agent_timeout_s, agent_stream,
    evolution_url, evolution_api_key, evolution_instance, webhook_secret, enabled, created_at, updated_at,
    input_cost_per_mtok, output_cost_per_mtok"""
# Seconds a worker trusts its cached copy; other workers see a PATCH within this time.
CACHE_TTL = 5.0


class InvalidInstance(ValueError):
    """A field of an instance request is wrong; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class DuplicateInstance(Exception):
    """An instance with that name exists."""


@dataclass(frozen=True)
class Instance:
    """An instance as the pipeline needs it."""

    id: int
    name: str
    agent_api_url: str
    agent_api_key: str | None
    agent_name: str
    agent_timeout_s: float
    agent_stream: bool
    evolution_url: str
    evolution_api_key: str | None
    evolution_instance: str
    webhook_secret: str | None
    enabled: bool
    input_cost_per_mtok: float | None = None
    output_cost_per_mtok: float | None = None

    def cost_usd(self, input_tokens: int | None, output_tokens: int | None) -> Decimal | None:
        """What the tokens cost at this instance's prices; None when usage or a needed price is unknown."""
        if input_tokens is None and output_tokens is None:
            return None
        if self.input_cost_per_mtok is None and self.output_cost_per_mtok is None:
            return None
        total = Decimal(0)
        for tokens, price in ((input_tokens, self.input_cost_per_mtok),
                              (output_tokens, self.output_cost_per_mtok)):
            if not tokens:
                continue
            if price is None:
                return None  # tokens of a type without a price: a partial sum would mislead
            # repr() is the shortest exact spelling of the float the user typed (0.15, not
            # 0.1499999...), so the stored cost is the decimal product the user expects.
            total += tokens * Decimal(repr(price))
        return total / 1_000_000


def _url(field: str, value: Any) -> str:
    if not isinstance(value, str) or len(value) > 2048:
        raise InvalidInstance(field, f"{field} must be an http(s) URL")
    try:
        parsed = urlparse(value)
        parsed.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise InvalidInstance(field, f"{field} must be an http(s) URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname or not value.isascii():
        raise InvalidInstance(field, f"{field} must be an http(s) URL with a host")
    return value.rstrip("/")


def _opt_str(field: str, value: Any, lo: int = 1, hi: int = 1024) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not lo <= len(value) <= hi or "\x00" in value:
        raise InvalidInstance(field, f"{field} must be a string of {lo} to {hi} characters or null")
    return value


def _bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidInstance(field, f"{field} must be true or false")
    return value


_VALIDATORS: dict[str, Callable[[Any], Any]] = {
    "agent_api_url": lambda v: _url("agent_api_url", v),
    "evolution_url": lambda v: _url("evolution_url", v),
    "agent_api_key": lambda v: _opt_str("agent_api_key", v),
    "evolution_api_key": lambda v: _opt_str("evolution_api_key", v),
    "evolution_instance": lambda v: _opt_str("evolution_instance", v, 1, 128),
    "webhook_secret": lambda v: _opt_str("webhook_secret", v, 8, 256),
    "agent_stream": lambda v: _bool("agent_stream", v),
    "enabled": lambda v: _bool("enabled", v),
}


def _agent_name(value: Any) -> str:
    if not isinstance(value, str) or not AGENT_NAME_RE.match(value):
        raise InvalidInstance("agent_name", "agent_name must match ^[A-Za-z0-9._-]{1,64}$")
    return value


def _timeout(value: Any) -> float:
    # Below 0.1 s no real agent can answer; it would only turn every message into a timeout.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.1 <= value <= 600:
        raise InvalidInstance("agent_timeout_s", "agent_timeout_s must be a number in [0.1, 600]")
    return float(value)


def _price(field: str):
    def check(value: Any) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1e6:
            raise InvalidInstance(field, f"{field} must be a number of USD per million tokens "
                                         "in [0, 1000000] or null")
        return float(value)
    return check


_VALIDATORS["agent_name"] = _agent_name
_VALIDATORS["input_cost_per_mtok"] = _price("input_cost_per_mtok")
_VALIDATORS["output_cost_per_mtok"] = _price("output_cost_per_mtok")
_VALIDATORS["agent_timeout_s"] = _timeout
REQUIRED = ("name", "agent_api_url", "evolution_url")


def validate(body: Any, *, partial: bool) -> dict:
    """Check a create (partial=False) or update body; return the clean fields."""
    if not isinstance(body, dict):
        raise InvalidInstance("body", "the body must be a JSON object")
    allowed = set(_VALIDATORS) | ({"name"} if not partial else set())
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidInstance(unknown[0], f"unknown or read-only field: {unknown[0]}")
    if partial and not body:
        raise InvalidInstance("body", "nothing to update")
    clean: dict = {}
    if not partial:
        for name in REQUIRED:
            if name not in body:
                raise InvalidInstance(name, f"{name} is required")
        if not isinstance(body["name"], str) or not NAME_RE.match(body["name"]):
            raise InvalidInstance("name", "name must match ^[a-z0-9][a-z0-9_-]{0,62}$")
        clean["name"] = body["name"]
    for key, value in body.items():
        if key != "name":
            clean[key] = _VALIDATORS[key](value)
    return clean


def mask(secret: str | None) -> str | None:
    """Enough of a secret to recognise it, never enough to use it."""
    if not secret:
        return None
    return "****" + secret[-4:] if len(secret) >= 12 else "****"


def public(row: dict) -> dict:
    """An instance row as the API shows it: secrets masked."""
    out = {k: v for k, v in row.items() if k not in SECRET_FIELDS}
    out["evolution_instance"] = row["evolution_instance"] or row["name"]
    for key in SECRET_FIELDS:
        out[key] = mask(row[key])
        out["has_" + key] = bool(row[key])
    for key in ("created_at", "updated_at"):
        out[key] = iso(row[key], "auto")
    return out


class InstanceRepo:
    """CRUD on the instance table plus the webhook-path cache."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._cache: dict[str, tuple[float, Instance | None]] = {}
        self._lock = threading.Lock()

    def create(self, fields: dict) -> dict:
        """Insert; DuplicateInstance if the name is taken."""
        cols = list(fields)
        try:
            row = self.db.fetchone(
                "INSERT INTO instance (" + ", ".join(cols) + ") VALUES ("
                + ", ".join(f"%({c})s" for c in cols) + f") RETURNING {COLUMNS}", fields)
        except UniqueViolation:
            raise DuplicateInstance(fields["name"]) from None
        # A webhook for this name may have cached "no such instance" a moment ago.
        self.forget(fields["name"])
        assert row is not None  # INSERT ... RETURNING returns the row
        return row

    def list(self) -> list[dict]:
        """Every instance, by name."""
        return self.db.fetchall(f"SELECT {COLUMNS} FROM instance ORDER BY name")

    def get(self, name: str) -> dict | None:
        """One instance row by name."""
        return self.db.fetchone(f"SELECT {COLUMNS} FROM instance WHERE name = %(name)s", {"name": name})

    def update(self, name: str, fields: dict) -> dict | None:
        """Change fields (validated names only); None if missing."""
        sets = ", ".join(f"{c} = %({c})s" for c in fields)
        row = self.db.fetchone(f"UPDATE instance SET {sets}, updated_at = now() WHERE name = %(_name)s "
                               f"RETURNING {COLUMNS}", {**fields, "_name": name})
        self.forget(name)
        return row

    def delete(self, name: str) -> bool:
        """Remove; False if missing."""
        gone = self.db.execute("DELETE FROM instance WHERE name = %(name)s", {"name": name}) > 0
        self.forget(name)
        return gone

    def forget(self, name: str) -> None:
        """Drop the cached copy of an instance."""
        with self._lock:
            self._cache.pop(name, None)

    def lookup(self, name: str) -> Instance | None:
        """The instance for a webhook, from a cache refreshed every few seconds."""
        now = time.monotonic()
        hit = self._cache.get(name)
        if hit is not None and now - hit[0] < CACHE_TTL:
            return hit[1]
        row = self.get(name) if NAME_RE.match(name) else None
        inst = None if row is None else Instance(
            id=row["id"], name=row["name"], agent_api_url=row["agent_api_url"],
            agent_api_key=row["agent_api_key"], agent_name=row["agent_name"],
            agent_timeout_s=float(row["agent_timeout_s"]), agent_stream=row["agent_stream"],
            evolution_url=row["evolution_url"], evolution_api_key=row["evolution_api_key"],
            evolution_instance=row["evolution_instance"] or row["name"],
            webhook_secret=row["webhook_secret"], enabled=row["enabled"],
            input_cost_per_mtok=row["input_cost_per_mtok"], output_cost_per_mtok=row["output_cost_per_mtok"])
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[name] = (now, inst)
        return inst
