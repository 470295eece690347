"""An accepted message on its way through the pipeline, and its step records."""
from __future__ import annotations

import datetime as dt
import os
import socket
import uuid
from dataclasses import dataclass, field
from decimal import Decimal

from app.instances import Instance
from app.vocabulary import iso, utcnow


def owner_id() -> str:
    """host:pid of this worker, stored on the rows it processes so recovery can find them."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Message:
    """An accepted message: who sent what to which instance, and what happened to it."""

    trace_id: uuid.UUID
    instance: Instance
    user_id: str
    digits: str             # of the agent's session_name: the phone, else the LID
    text: str
    received_at: dt.datetime
    started: float
    reply_number: str = ""  # sendText `number`: phone digits or a LID JID
    steps: list[dict] = field(default_factory=list)
    current_step: str = "agent_called"
    reply_text: str | None = None
    reply_id: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost_usd: Decimal | None = None
    agent_session_id: str | None = None
    # A canary's message (app/canary.py): traced and logged, counted only in the canary metrics.
    synthetic: bool = False

    def record(self, step: str, status: str, seconds: float | None, error: str | None = None,
               **extra) -> dict:
        """Append a step entry (the trace's `steps` item) and return it."""
        entry = {"step": step, "status": status,
                 "duration_ms": None if seconds is None else int(round(seconds * 1000)),
                 "timestamp": iso(utcnow())}
        if error:
            entry["error"] = error
        entry.update(extra)
        self.steps.append(entry)
        return entry
