"""Instances API (SPEC 4.4) in-process on a real PostgreSQL."""
from __future__ import annotations

import json

import pytest

from tests.support import API_KEY, free_port, migrate, webhook

H = {"x-api-key": API_KEY}
AGENT_KEY = "agent-secret-KEY-0123456789"
EVO_KEY = "evolution-secret-KEY-9876543210"
HOOK_SECRET = "webhook-secret-ABCDEFGH"
SECRETS = (AGENT_KEY, EVO_KEY, HOOK_SECRET)
# An address nobody listens on: the pipeline's agent call fails fast, which is fine here.
DEAD_URL = f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def shared_url(pg):
    """One database for the validation tests (which must never create anything)."""
    url = pg.create_database()
    migrate(url)
    return url


@pytest.fixture()
def app(app_factory):
    return app_factory(enable_tracing=False)


@pytest.fixture()
def shared_api(app_factory, shared_url):
    return Recorder(app_factory(shared_url, enable_tracing=False).test_client())


@pytest.fixture()
def client(app):
    return app.test_client()


class Recorder:
    """A test client wrapper that keeps every response body, to look for leaked secrets."""

    def __init__(self, client) -> None:
        self.client = client
        self.bodies: list[str] = []

    def __call__(self, method: str, path: str, body=None, headers=None, **kw):
        h = dict(H if headers is None else headers)
        if body is not None:
            kw["data"] = body if isinstance(body, (str, bytes)) else json.dumps(body)
            kw.setdefault("content_type", "application/json")
        r = self.client.open(path, method=method, headers=h, **kw)
        self.bodies.append(r.get_data(as_text=True))
        return r


@pytest.fixture()
def api(client):
    return Recorder(client)


def full_body(name="bot-1", **extra):
    return {"name": name, "agent_api_url": DEAD_URL + "/", "evolution_url": DEAD_URL,
            "agent_api_key": AGENT_KEY, "evolution_api_key": EVO_KEY, "webhook_secret": HOOK_SECRET,
            "agent_name": "helper", "agent_timeout_s": 12.5, "agent_stream": True,
            "evolution_instance": "evo-one", "enabled": True, **extra}


def test_create_get_list_patch_never_show_secrets(api):
    r = api("POST", "/api/v1/instances", full_body())
    assert r.status_code == 201, r.get_json()
    created = r.get_json()
    assert isinstance(created["id"], int) and not isinstance(created["id"], bool)
    assert created["name"] == "bot-1"
    assert created["agent_api_url"] == DEAD_URL            # trailing slash removed
    assert created["agent_name"] == "helper" and created["agent_timeout_s"] == 12.5
    assert created["agent_stream"] is True and created["evolution_instance"] == "evo-one"
    assert created["enabled"] is True
    for key in ("agent_api_key", "evolution_api_key", "webhook_secret"):
        assert created[key] is None or created[key].startswith("****"), created[key]
    r = api("GET", "/api/v1/instances/bot-1")
    assert r.status_code == 200 and r.get_json()["id"] == created["id"]
    r = api("GET", "/api/v1/instances")
    assert r.status_code == 200 and [i["name"] for i in r.get_json()] == ["bot-1"]
    r = api("PATCH", "/api/v1/instances/bot-1", {"agent_api_key": "other-" + AGENT_KEY,
                                                  "webhook_secret": "x" + HOOK_SECRET})
    assert r.status_code == 200
    r = api("GET", "/api/v1/instances/bot-1")
    assert r.status_code == 200
    secrets = SECRETS + ("other-" + AGENT_KEY, "x" + HOOK_SECRET)
    for body in api.bodies:
        for secret in secrets:
            assert secret not in body, f"secret {secret!r} shown in {body}"
    # The secrets are stored, though: the webhook needs the new one.
    for headers, want in (({}, 401), ({"x-webhook-secret": HOOK_SECRET}, 401),
                          ({"x-webhook-secret": "x" + HOOK_SECRET}, 202)):
        r = api.client.post("/webhook/evolution/bot-1", json=webhook("bot-1", "hi"), headers=headers)
        assert r.status_code == want, (headers, r.status_code, r.get_json())


def test_defaults(api):
    r = api("POST", "/api/v1/instances", {"name": "plain", "agent_api_url": DEAD_URL,
                                          "evolution_url": DEAD_URL})
    assert r.status_code == 201, r.get_json()
    body = r.get_json()
    assert body["agent_name"] == "default"
    assert body["agent_timeout_s"] == 60
    assert body["agent_stream"] is False
    assert body["evolution_instance"] == "plain"
    assert body["enabled"] is True
    for key in ("agent_api_key", "evolution_api_key", "webhook_secret"):
        assert not body[key]
    assert body["input_cost_per_mtok"] is None and body["output_cost_per_mtok"] is None
    assert api("GET", "/api/v1/instances/plain").get_json() == body


def test_prices_are_created_patched_shown_and_unset(api):
    r = api("POST", "/api/v1/instances", full_body("priced", input_cost_per_mtok=3,
                                                   output_cost_per_mtok=15.5))
    assert r.status_code == 201, r.get_json()
    assert (r.get_json()["input_cost_per_mtok"], r.get_json()["output_cost_per_mtok"]) == (3, 15.5)
    r = api("PATCH", "/api/v1/instances/priced", {"input_cost_per_mtok": 0.15})
    assert r.status_code == 200 and r.get_json()["input_cost_per_mtok"] == 0.15
    assert r.get_json()["output_cost_per_mtok"] == 15.5
    shown = api("GET", "/api/v1/instances/priced").get_json()
    assert (shown["input_cost_per_mtok"], shown["output_cost_per_mtok"]) == (0.15, 15.5)
    listed = {i["name"]: i for i in api("GET", "/api/v1/instances").get_json()}
    assert listed["priced"]["input_cost_per_mtok"] == 0.15
    r = api("PATCH", "/api/v1/instances/priced", {"input_cost_per_mtok": None, "output_cost_per_mtok": 0})
    assert (r.get_json()["input_cost_per_mtok"], r.get_json()["output_cost_per_mtok"]) == (None, 0)
    for bad in (-0.01, "3", True, 1e7, [1]):
        r = api("PATCH", "/api/v1/instances/priced", {"output_cost_per_mtok": bad})
        assert r.status_code == 400 and r.get_json()["detail"]["field"] == "output_cost_per_mtok", bad


def test_duplicate_is_409(api):
    assert api("POST", "/api/v1/instances", full_body("dup")).status_code == 201
    r = api("POST", "/api/v1/instances", full_body("dup", agent_name="other"))
    assert r.status_code == 409 and "error" in r.get_json()
    assert api("GET", "/api/v1/instances/dup").get_json()["agent_name"] == "helper"


BASE = {"name": "ok-name", "agent_api_url": "http://agent.example", "evolution_url": "https://evo.example"}


@pytest.mark.parametrize("field,body", [
    ("name", {**BASE, "name": "Bad"}),
    ("name", {**BASE, "name": "-lead"}),
    ("name", {**BASE, "name": "a" * 64}),
    ("name", {**BASE, "name": "has space"}),
    ("name", {**BASE, "name": ""}),
    ("name", {**BASE, "name": 7}),
    ("name", {k: v for k, v in BASE.items() if k != "name"}),
    ("agent_api_url", {k: v for k, v in BASE.items() if k != "agent_api_url"}),
    ("evolution_url", {k: v for k, v in BASE.items() if k != "evolution_url"}),
    ("agent_api_url", {**BASE, "agent_api_url": "not a url"}),
    ("agent_api_url", {**BASE, "agent_api_url": "ftp://agent.example"}),
    ("evolution_url", {**BASE, "evolution_url": "http://"}),
    ("evolution_url", {**BASE, "evolution_url": 5}),
    ("agent_timeout_s", {**BASE, "agent_timeout_s": 0}),
    ("agent_timeout_s", {**BASE, "agent_timeout_s": 601}),
    ("agent_timeout_s", {**BASE, "agent_timeout_s": "x"}),
    ("agent_timeout_s", {**BASE, "agent_timeout_s": -1}),
    ("agent_timeout_s", {**BASE, "agent_timeout_s": True}),
    ("agent_stream", {**BASE, "agent_stream": "yes"}),
    ("enabled", {**BASE, "enabled": 1}),
    ("agent_name", {**BASE, "agent_name": "a/b"}),
    ("webhook_secret", {**BASE, "webhook_secret": "short"}),
    ("input_cost_per_mtok", {**BASE, "input_cost_per_mtok": -1}),
    ("output_cost_per_mtok", {**BASE, "output_cost_per_mtok": "0.5"}),
    ("bogus", {**BASE, "bogus": 1}),
    ("id", {**BASE, "id": 5}),
    ("body", [BASE]),
    ("body", json.dumps("just a string")),
    ("body", "42"),
])
def test_bad_fields_are_400(shared_api, field, body):
    api = shared_api
    r = api("POST", "/api/v1/instances", body)
    assert r.status_code == 400, (field, r.status_code, r.get_json())
    out = r.get_json()
    assert out["detail"]["field"] == field, out
    assert api("GET", "/api/v1/instances").get_json() == []


def test_bad_bodies(shared_api):
    api = shared_api
    r = api("POST", "/api/v1/instances", "{not json", content_type="application/json")
    assert r.status_code == 400 and "error" in r.get_json()
    r = api("POST", "/api/v1/instances", json.dumps(BASE), content_type="text/plain")
    assert r.status_code == 415 and "error" in r.get_json()
    r = api("POST", "/api/v1/instances", "name=x", content_type="application/x-www-form-urlencoded")
    assert r.status_code == 415
    r = api("POST", "/api/v1/instances", "null")
    assert r.status_code == 400
    r = api("POST", "/api/v1/instances")
    assert r.status_code in (400, 415)
    assert api("GET", "/api/v1/instances").get_json() == []


def test_get_patch_delete_and_404(api):
    assert api("POST", "/api/v1/instances", full_body("one")).status_code == 201
    r = api("PATCH", "/api/v1/instances/one", {"agent_timeout_s": 30, "enabled": False,
                                                "agent_api_key": None})
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["agent_timeout_s"] == 30 and body["enabled"] is False and not body["agent_api_key"]
    assert body["agent_name"] == "helper"                   # untouched
    assert api("GET", "/api/v1/instances/one").get_json() == body
    assert api("PATCH", "/api/v1/instances/one", {}).status_code == 400
    r = api("PATCH", "/api/v1/instances/one", {"name": "two"})
    assert r.status_code == 400 and r.get_json()["detail"]["field"] == "name"
    r = api("PATCH", "/api/v1/instances/one", {"agent_timeout_s": 0})
    assert r.status_code == 400 and r.get_json()["detail"]["field"] == "agent_timeout_s"
    assert api("GET", "/api/v1/instances/one").get_json()["agent_timeout_s"] == 30
    for method, body in (("GET", None), ("PATCH", {"enabled": True}), ("DELETE", None)):
        r = api(method, "/api/v1/instances/missing", body)
        assert r.status_code == 404, (method, r.status_code)
        assert "error" in r.get_json()
    r = api("DELETE", "/api/v1/instances/one")
    assert r.status_code == 204 and r.get_data() == b""
    assert api("GET", "/api/v1/instances/one").status_code == 404
    assert api("DELETE", "/api/v1/instances/one").status_code == 404


def test_patch_is_seen_by_the_webhook_at_once(api):
    """InstanceRepo.lookup caches for seconds; PATCH and DELETE must not wait for it."""
    client = api.client
    assert api("POST", "/api/v1/instances", {"name": "hook", "agent_api_url": DEAD_URL,
                                             "evolution_url": DEAD_URL}).status_code == 201

    def send():
        return client.post("/webhook/evolution/hook", json=webhook("hook", "hello")).status_code

    assert send() == 202                                      # now cached as enabled
    assert api("PATCH", "/api/v1/instances/hook", {"enabled": False}).status_code == 200
    assert send() == 404
    assert api("PATCH", "/api/v1/instances/hook", {"enabled": True, "webhook_secret": HOOK_SECRET}
               ).status_code == 200
    assert send() == 401
    r = client.post("/webhook/evolution/hook?token=" + HOOK_SECRET, json=webhook("hook", "hello"))
    assert r.status_code == 202
    assert api("DELETE", "/api/v1/instances/hook").status_code == 204
    assert send() == 404
    # Re-created under the same name: found again at once (no stale "missing" entry).
    assert api("POST", "/api/v1/instances", {"name": "hook", "agent_api_url": DEAD_URL,
                                             "evolution_url": DEAD_URL}).status_code == 201
    assert send() == 202


def test_api_key_required(app_factory):
    # A high failed-attempt allowance: this test makes 10 failures on purpose.
    api = Recorder(app_factory(enable_tracing=False, auth_failures_per_minute=100).test_client())
    assert api("POST", "/api/v1/instances", full_body("guarded")).status_code == 201
    for headers in ({}, {"x-api-key": "nope-" + API_KEY}):
        for method, path, body in (("GET", "/api/v1/instances", None),
                                   ("POST", "/api/v1/instances", full_body("other")),
                                   ("GET", "/api/v1/instances/guarded", None),
                                   ("PATCH", "/api/v1/instances/guarded", {"enabled": False}),
                                   ("DELETE", "/api/v1/instances/guarded", None)):
            r = api(method, path, body, headers=headers)
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert "error" in r.get_json()
    # Nothing changed.
    r = api("GET", "/api/v1/instances")
    assert r.status_code == 200
    assert [(i["name"], i["enabled"]) for i in r.get_json()] == [("guarded", True)]
