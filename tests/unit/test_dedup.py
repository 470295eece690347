"""Duplicate detection without tracing, and NUL handling of trace batches."""
from __future__ import annotations

import uuid


def test_recent_ids_dedup_and_hold_nothing_the_collector_walks():
    """The tracing-off duplicate memory: a repeat maps to the first trace id, the oldest ids
    are forgotten past `size`, and no entry is an object the garbage collector tracks (with
    UUIDs as values each full collection walked all 100,000 of them)."""
    import gc

    from app.dedup import RecentIds

    ids = RecentIds(size=3)
    first = uuid.uuid4()
    assert ids.claim(1, "MSG-A", first) == (first, True)
    assert ids.claim(1, "MSG-A", uuid.uuid4()) == (first, False)
    other = uuid.uuid4()
    assert ids.claim(2, "MSG-A", other) == (other, True)  # same id, another instance
    for n in range(3):
        ids.claim(1, f"MSG-{n}", uuid.uuid4())
    fresh = uuid.uuid4()
    assert ids.claim(1, "MSG-A", fresh) == (fresh, True)  # forgotten after 3 newer ones
    assert len(ids._ids) == 3  # noqa: SLF001
    for key, value in ids._ids.items():  # noqa: SLF001
        assert not gc.is_tracked(key) and not gc.is_tracked(value), (key, value)


def test_rows_json_replaces_nul_only():
    """The batch parameter: NUL anywhere (nested steps too) becomes U+FFFD; a literal
    backslash-u0000 typed by a user is kept as typed."""
    import json

    from app.traces.store import rows_json

    rows = [["a\x00b", {"error": "x\x00"}, [None, 3]], ["typed \\u0000 here"]]
    assert json.loads(rows_json(rows)) == [["a\ufffdb", {"error": "x\ufffd"}, [None, 3]],
                                           ["typed \\u0000 here"]]
