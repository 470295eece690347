"""The Flask app in-process (Flask's test client), with no database behind it."""
from __future__ import annotations

import json

import pytest

from app import create_app
from app.config import Settings
from app.telemetry.recorder import NullRecorder, Recorder
from tests.support import ROOT

KEY = "in-process-key-123"


@pytest.fixture()
def client():
    # Nothing listens on port 1: the routes that need the database see it down.
    settings = Settings(api_key=KEY, database_url="postgresql://nobody@127.0.0.1:1/none",
                        enable_tracing=False)
    app = create_app(settings)
    yield app.test_client()
    app.extensions["omni"].shutdown()


def test_openapi_document_is_served_from_the_repository(client):
    r = client.get("/openapi.json")
    assert r.status_code == 200
    assert r.get_json() == json.loads((ROOT / "app" / "openapi.json").read_text())


def test_health_is_degraded_without_a_database(client):
    r = client.get("/health")
    assert r.status_code == 503
    assert r.get_json()["status"] == "degraded"
    assert r.get_json()["checks"]["database"].startswith("error")


def test_a_webhook_that_is_not_json_is_refused_before_any_lookup(client):
    r = client.post("/webhook/evolution/bot", data="x", content_type="text/plain")
    assert r.status_code == 415


def test_the_trace_api_wants_the_key(client):
    assert client.get("/api/v1/traces").status_code == 401


def test_metrics_off_means_a_null_recorder_and_no_endpoint():
    settings = Settings(api_key=KEY, database_url="postgresql://nobody@127.0.0.1:1/none",
                        enable_tracing=False, enable_metrics=False)
    app = create_app(settings)
    try:
        rt = app.extensions["omni"]
        assert isinstance(rt.recorder, NullRecorder)
        assert app.test_client().get("/metrics").status_code == 404
    finally:
        app.extensions["omni"].shutdown()


def test_the_null_recorder_answers_every_recorder_method():
    public = [name for name in vars(Recorder) if not name.startswith("_")]
    assert public
    for name in public:
        assert getattr(NullRecorder, name)(1, 2, 3, 4) is None
