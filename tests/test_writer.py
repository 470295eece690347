"""The group-commit trace writer against a real PostgreSQL."""
from __future__ import annotations

import datetime as dt
import threading
import time
import uuid

import pytest

from app.db import Database, DatabaseUnavailable
from app.traces.store import FinishedTrace, NewTrace, TraceStore
from app.traces.writer import FINISH_LINGER_S, TraceWriter


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


def _finished(trace_id: uuid.UUID) -> FinishedTrace:
    return FinishedTrace(trace_id=trace_id, status="completed", duration_ms=5, response_content="ok",
                         steps=[], failed_step=None, error_message=None)


def _status(db: Database, trace_id: uuid.UUID) -> str:
    return db.fetchone("SELECT status FROM message_trace WHERE trace_id = %(id)s", {"id": trace_id})["status"]


def test_final_states_ride_with_new_rows_or_go_after_the_linger(writer):
    first, _ = writer.insert(_row()).result(timeout=10)
    batches = writer.batches
    writer.finish(_finished(first))
    # Alone, a final state waits for company, then goes on its own within the linger.
    time.sleep(FINISH_LINGER_S / 5)
    assert writer.batches == batches and writer.pending == 1
    deadline = time.monotonic() + 5
    while writer.pending and time.monotonic() < deadline:
        time.sleep(0.005)
    assert writer.pending == 0 and writer.batches == batches + 1
    assert _status(writer.db, first) == "completed"
    # With a new row arriving, it shares that row's transaction.
    second, _ = writer.insert(_row()).result(timeout=10)
    writer.finish(_finished(second))
    batches = writer.batches
    third, _ = writer.insert(_row()).result(timeout=10)
    assert writer.batches == batches + 1 and writer.pending == 0
    assert _status(writer.db, second) == "completed" and _status(writer.db, third) == "processing"


def test_flush_does_not_wait_for_the_linger(writer, monkeypatch):
    monkeypatch.setattr("app.traces.writer.FINISH_LINGER_S", 30.0)
    trace_id, _ = writer.insert(_row()).result(timeout=10)
    writer.finish(_finished(trace_id))
    t0 = time.monotonic()
    assert writer.flush(timeout=5)
    assert time.monotonic() - t0 < 5
    assert _status(writer.db, trace_id) == "completed"
