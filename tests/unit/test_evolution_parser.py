"""The Evolution webhook parser (app/evolution.py) on every shape of the fixture corpus.
"""
from __future__ import annotations

import json

import pytest

from app import evolution
from tests.support import ROOT

FIXTURES = sorted((ROOT / "tests" / "fixtures" / "evolution").glob("*.json"))
CORPUS = {p.stem: json.loads(p.read_text()) for p in FIXTURES}


def test_corpus_covers_every_answer_and_reason():
    answers = {f["expect"]["status"] if "status" in f["expect"] else f["expect"]["http"]
               for f in CORPUS.values()}
    assert answers >= {"accepted", "ignored", "recorded", 400}
    reasons = {f["expect"].get("reason") for f in CORPUS.values()} - {None}
    # Every reason the parser can give has a real payload behind it.
    parser_reasons = set(evolution.IGNORE_REASONS) - {"receipt_unknown"}
    assert parser_reasons - reasons == set()


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_parser_reads_each_shape(name):
    fixture = CORPUS[name]
    body, expect = fixture["webhook"], fixture["expect"]
    if expect["http"] == 400:
        with pytest.raises(evolution.Malformed, match=expect["error_contains"].replace(".", r"\.")):
            evolution.read_webhook(body)
        return
    got = evolution.read_webhook(body)
    if expect["status"] == "ignored":
        assert isinstance(got, evolution.Ignored) and got.reason == expect["reason"], got
    elif expect["status"] == "recorded":
        assert got == evolution.Receipt(message_id=body["data"]["keyId"], status=expect["receipt"])
    else:
        assert isinstance(got, evolution.Inbound), got
        if "reply_number" in expect and "lid:" not in expect.get("user_id", ""):
            assert got.reply_number == expect["reply_number"]
        if "message_content" in expect:
            assert got.text == expect["message_content"]
        if "message_type" in expect:
            assert got.message_type == expect["message_type"]


def test_platform_time_forms():
    at = "2025-12-19T10:30:00+00:00"
    for value in (1766140200, "1766140200", 1766140200000, {"low": 1766140200, "high": 0, "unsigned": False},
                  1766140200.0):
        assert evolution.platform_time(value).isoformat() == at, value
    for value in (None, True, "soon", {"low": "x"}, -5, 0, 10**15, float("nan"), [1]):
        assert evolution.platform_time(value) is None, value
    # A Long whose low word has the sign bit set (after 2038) is unsigned arithmetic, not negative.
    assert evolution.platform_time({"low": -2, "high": 0, "unsigned": False}) is None
    assert evolution.normalize_event("MESSAGES_UPSERT") == evolution.normalize_event("messages-upsert") \
        == "messages.upsert"
