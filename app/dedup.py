"""Duplicate detection when tracing is off (no trace rows to deduplicate against)."""
from __future__ import annotations

import collections
import threading
import uuid


class RecentIds:
    """The last N message ids of this worker mapped to their trace ids (best effort).

    Entries are plain strings and bytes, never UUID objects or tuples: objects the garbage
    collector tracks would make each of its full passes walk all N entries (with 100,000
    UUIDs, a quarter of an all-off worker's CPU at saturation went to the collector; bench/).
    """

    def __init__(self, size: int = 100_000) -> None:
        self.size = size
        self._ids: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def claim(self, instance_id: int, message_id: str, trace_id: uuid.UUID) -> tuple[uuid.UUID, bool]:
        """(trace id, True) for a new message; (original trace id, False) for a repeat."""
        key = f"{instance_id}\x00{message_id}"
        with self._lock:
            found = self._ids.get(key)
            if found is not None:
                return uuid.UUID(bytes=found), False
            self._ids[key] = trace_id.bytes
            if len(self._ids) > self.size:
                self._ids.popitem(last=False)
            return trace_id, True
