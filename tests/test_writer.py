"""The group-commit trace writer against a real PostgreSQL."""
from __future__ import annotations

import datetime as dt
import threading
import uuid

import pytest

from app.db import Database, DatabaseUnavailable
from app.traces.store import NewTrace, TraceStore
from app.traces.writer import TraceWriter


def _row(message_id: str | None = None) -> NewTrace:
    return NewTrace(trace_id=uuid.uuid4(), instance_id=1, instance_name="w",
                    message_id=message_id or uuid.uuid4().hex, user_id="whatsapp:+1555",
                    message_content="hi", created_at=dt.datetime.now(dt.timezone.utc), steps=[],
                    owner="test:1")


@pytest.fixture()
def writer(fresh_db):
    db = Database(fresh_db, size=2)
    w = TraceWriter(db, TraceStore(db))
    w.start()
    yield w
    w.stop()
    db.close()


def test_concurrent_inserts_share_commits(writer):
    results, barrier = [], threading.Barrier(40)

    def insert():
        barrier.wait()
        results.append(writer.insert(_row()).result(timeout=10))

    threads = [threading.Thread(target=insert) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 40 and all(inserted for _, inserted in results)
    assert writer.batches < 40, "every row had its own transaction"


def test_duplicates_in_one_batch_map_to_the_first(writer):
    futures = [writer.insert(_row("same-id")) for _ in range(5)]
    answers = [f.result(timeout=10) for f in futures]
    assert sum(1 for _, inserted in answers if inserted) == 1
    assert len({trace_id for trace_id, _ in answers}) == 1


def test_an_unexpected_error_fails_the_batch_not_the_thread(writer, monkeypatch):
    calls = {"n": 0}
    original = writer.store.insert_new

    def broken_once(cur, rows):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ValueError("unexpected")
        return original(cur, rows)

    monkeypatch.setattr(writer.store, "insert_new", broken_once)
    with pytest.raises(DatabaseUnavailable):
        writer.insert(_row()).result(timeout=10)
    assert writer.insert(_row()).result(timeout=10)[1] is True
