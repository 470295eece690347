"""Who a WhatsApp LID is: LID -> phone, learned from messages that carry both.

WhatsApp addresses most one-to-one chats by LID now; some messages name the sender's phone
beside it, some do not. One person must stay one `user_id` (analytics' top users and the
user filter must not split them), so a LID seen once with its phone keeps that phone, in
the database for every worker and replica, with a per-worker cache in front so the
ordinary message (a LID the worker already knows) costs no statement at all.
"""
from __future__ import annotations

import collections
import logging
import threading

from app.db import DatabaseError, DatabaseUnavailable

log = logging.getLogger("omni.contacts")

LEARN_SQL = """INSERT INTO whatsapp_lid AS w (lid, phone) VALUES (%(lid)s, %(phone)s)
    ON CONFLICT (lid) DO UPDATE SET phone = EXCLUDED.phone, updated_at = now()
    WHERE w.phone IS DISTINCT FROM EXCLUDED.phone"""
LOOKUP_SQL = "SELECT phone FROM whatsapp_lid WHERE lid = %(lid)s"


class LidDirectory:
    """LID -> phone digits, shared through the whatsapp_lid table."""

    def __init__(self, db, size: int = 100_000, on_error=None) -> None:
        self.db = db
        self.size = size
        self.on_error = on_error or (lambda: None)
        self._cache: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._lock = threading.Lock()

    def _remember(self, lid: str, phone: str) -> None:
        with self._lock:
            self._cache[lid] = phone
            self._cache.move_to_end(lid)
            if len(self._cache) > self.size:
                self._cache.popitem(last=False)

    def learn(self, lid: str, phone: str) -> None:
        """Record that this LID is this phone (a statement only when it is news here)."""
        if self._cache.get(lid) == phone:
            return
        try:
            self.db.execute(LEARN_SQL, {"lid": lid, "phone": phone})
        except (DatabaseUnavailable, DatabaseError) as exc:
            # The message is still handled under its phone; only a later LID-only message
            # of this person may get the LID user_id until the mapping is written.
            self.on_error()
            log.warning("LID mapping not stored", extra={"event": "lid_learn_failed", "error": str(exc)})
            return
        self._remember(lid, phone)

    def phone_for(self, lid: str) -> str | None:
        """The phone digits last seen with this LID, or None."""
        found = self._cache.get(lid)
        if found is not None:
            return found
        try:
            row = self.db.fetchone(LOOKUP_SQL, {"lid": lid})
        except (DatabaseUnavailable, DatabaseError) as exc:
            self.on_error()
            log.warning("LID lookup failed", extra={"event": "lid_lookup_failed", "error": str(exc)})
            return None
        if row is None:
            return None
        self._remember(lid, row["phone"])
        return row["phone"]
