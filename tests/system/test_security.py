"""Security: brute-force limits, constant-time comparison, secrets kept out of
logs/traces/errors/metrics, the /metrics bearer token, webhook rate limits, compose exposure.

Brute-force tests run on their own services: blocking 127.0.0.1 on the shared session
service would make every other test answer 429.
"""
from __future__ import annotations

import concurrent.futures
import re
import time
import uuid

import psycopg2
import pytest
import requests
import yaml

from tests.support import API_KEY, ROOT, metric, parse_metrics, webhook

WRONG = "wrong-key-0123456789"


def _metrics(svc) -> dict:
    return parse_metrics(svc.metrics_text())


def _events(svc, event: str) -> list[dict]:
    return [line for line in svc.log_lines() if line.get("event") == event]


def _wait_events(svc, event: str, n: int, timeout: float = 5.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _events(svc, event)
        if len(found) >= n:
            return found
        time.sleep(0.1)
    return _events(svc, event)


# --------------------------------------------------------------------------- brute force


def test_brute_force_one_worker_exactly_ten_then_429_even_with_the_right_key(make_service):
    """One worker: 10 wrong keys are 401, the 11th attempt 429 with Retry-After; the right key
    is then 429 too from that address, while another address (X-Forwarded-For through a
    trusted proxy) still gets in. Logged (auth_failed, rate_limited with client_ip), counted."""
    svc = make_service({"AUTOMAGIK_OMNI_TRUSTED_PROXIES": "1"}, workers=1)
    attacker = {"X-Forwarded-For": "203.0.113.7"}
    codes = [requests.get(svc.url + "/api/v1/instances", headers={"x-api-key": WRONG, **attacker},
                          timeout=10).status_code for _ in range(12)]
    assert codes[:10] == [401] * 10 and codes[10:] == [429, 429], codes
    r = requests.get(svc.url + "/api/v1/instances", headers={"x-api-key": API_KEY, **attacker}, timeout=10)
    assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 60
    assert r.json()["error"].startswith("too many failed authentication attempts")
    # A missing key counts as a failure too, and is also refused while blocked.
    assert requests.get(svc.url + "/api/v1/traces", headers=attacker, timeout=10).status_code == 429
    other = requests.get(svc.url + "/api/v1/instances",
                         headers={"x-api-key": API_KEY, "X-Forwarded-For": "198.51.100.9"}, timeout=10)
    assert other.status_code == 200
    m = _metrics(svc)
    assert metric(m, "omni_auth_failures_total", reason="wrong_key") == 10
    assert metric(m, "omni_auth_failures_total", reason="rate_limited") == 4
    failed = _wait_events(svc, "auth_failed", 10)
    limited = _wait_events(svc, "rate_limited", 4)
    assert len(failed) == 10 and all(e["client_ip"] == "203.0.113.7" for e in failed)
    assert all(e["level"] == "WARNING" and e["reason"] == "wrong_key" for e in failed)
    assert len(limited) == 4 and all(e["client_ip"] == "203.0.113.7" for e in limited)


def test_brute_force_limit_is_shared_by_both_workers(make_service):
    """Two workers share the count (PostgreSQL): exactly 10 wrong attempts are 401, then 429
    whichever worker answers, every 429 with Retry-After."""
    svc = make_service()
    answers = [requests.post(svc.url + "/api/v1/instances", json={},
                             headers={"x-api-key": WRONG}, timeout=10) for _ in range(25)]
    codes = [a.status_code for a in answers]
    assert codes == [401] * 10 + [429] * 15, codes
    assert all(int(a.headers["Retry-After"]) >= 1 for a in answers if a.status_code == 429)
    right = requests.get(svc.url + "/api/v1/instances", headers={"x-api-key": API_KEY}, timeout=10)
    assert right.status_code == 429
    m = _metrics(svc)
    assert metric(m, "omni_auth_failures_total", reason="wrong_key") == 10
    assert metric(m, "omni_auth_failures_total", reason="rate_limited") == 16
    assert _wait_events(svc, "rate_limited", 16)


def test_webhook_secret_guesses_are_throttled_per_address(make_service, sandbox):
    """Wrong `token=` values from one address: 10 are 401, then 429 with Retry-After on both
    workers, even with the right secret; the sender's own address (another X-Forwarded-For)
    still gets its webhooks through with the right secret, before and after."""
    svc = make_service({"AUTOMAGIK_OMNI_TRUSTED_PROXIES": "1"})
    secret = "hook-" + uuid.uuid4().hex
    svc.ensure_instance("guarded", sandbox.url, webhook_secret=secret)
    url = f"{svc.url}/webhook/evolution/guarded"
    evolution = {"X-Forwarded-For": "198.51.100.20"}
    attacker = {"X-Forwarded-For": "203.0.113.66"}

    def hook(token: str, headers: dict, text: str = "hi") -> requests.Response:
        return requests.post(url, params={"token": token}, json=webhook("guarded", text),
                             headers=headers, timeout=10)

    assert hook(secret, evolution).status_code == 202
    answers = [hook(f"guess-{i}", attacker) for i in range(40)]
    codes = [a.status_code for a in answers]
    assert codes == [401] * 10 + [429] * 30, codes
    assert all(1 <= int(a.headers["Retry-After"]) <= 60 for a in answers[10:])
    assert hook(secret, attacker).status_code == 429
    sender = [hook(secret, evolution, f"sender {i}") for i in range(6)]
    assert [a.status_code for a in sender] == [202] * 6, [a.text for a in sender]
    m = _metrics(svc)
    assert metric(m, "omni_auth_failures_total", reason="wrong_webhook_secret") == 10
    assert metric(m, "omni_auth_failures_total", reason="rate_limited") == 31
    for a in sender:
        svc.wait_final(a.json()["trace_id"])


# --------------------------------------------------------------------------- constant time


def test_every_secret_comparison_is_constant_time(app_factory, monkeypatch):
    """secret_equals delegates to hmac.compare_digest, and the API key, the metrics token and
    the webhook secret are all checked through it (spied in a real app)."""
    import hmac

    import app.web.auth as auth

    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((bytes(a), bytes(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert auth.secret_equals("abc", "abc") and not auth.secret_equals("abc", "abd")
    assert not auth.secret_equals(None, "x") and not auth.secret_equals("x", None)
    assert calls == [(b"abc", b"abc"), (b"abc", b"abd")]

    app = app_factory(metrics_token="metrics-token-0123456789", enable_metrics=True)
    client = app.test_client()
    calls.clear()
    assert client.get("/api/v1/instances", headers={"x-api-key": "guess-123456"}).status_code == 401
    assert (b"guess-123456", API_KEY.encode()) in calls
    calls.clear()
    assert client.get("/metrics", headers={"Authorization": "Bearer nope-1234"}).status_code == 401
    assert (b"nope-1234", b"metrics-token-0123456789") in calls
    calls.clear()
    body = {"name": "ct", "agent_api_url": "http://127.0.0.1:9", "evolution_url": "http://127.0.0.1:9",
            "webhook_secret": "hook-secret-0123456789"}
    assert client.post("/api/v1/instances", json=body, headers={"x-api-key": API_KEY}).status_code == 201
    calls.clear()
    r = client.post("/webhook/evolution/ct", json=webhook("ct", "hi"),
                    headers={"x-webhook-secret": "hook-guess"})
    assert r.status_code == 401
    assert (b"hook-guess", b"hook-secret-0123456789") in calls


# --------------------------------------------------------------------------- secrets never leak


def test_secrets_never_in_logs_traces_errors_or_metrics(make_service, sandbox):
    """At DEBUG, with every kind of secret in play (API key, metrics token, agent key,
    Evolution key, webhook secret in header and query): none appears in the service output,
    a trace row, an answer body or /metrics."""
    token = "metrics-" + uuid.uuid4().hex
    secrets = {"api_key": API_KEY, "metrics_token": token,
               "agent_key": "agent-" + uuid.uuid4().hex, "evolution_key": "evo-" + uuid.uuid4().hex,
               "webhook_secret": "hook-" + uuid.uuid4().hex}
    svc = make_service({"AUTOMAGIK_OMNI_LOG_LEVEL": "DEBUG", "AUTOMAGIK_OMNI_METRICS_TOKEN": token,
                        "AUTOMAGIK_OMNI_LOG_MESSAGE_CONTENT": "true"})
    bodies: list[str] = []

    def keep(r: requests.Response) -> requests.Response:
        bodies.append(r.text)
        bodies.append(str(dict(r.headers)))
        return r

    inst = {"name": "sec", "agent_api_url": sandbox.url, "evolution_url": sandbox.url,
            "agent_api_key": secrets["agent_key"], "evolution_api_key": secrets["evolution_key"],
            "webhook_secret": secrets["webhook_secret"]}
    assert keep(svc.api("POST", "/api/v1/instances", json=inst)).status_code == 201
    assert keep(svc.api("POST", "/api/v1/instances", json=inst)).status_code == 409
    keep(svc.api("GET", "/api/v1/instances"))
    keep(svc.api("GET", "/api/v1/instances/sec"))
    keep(svc.api("PATCH", "/api/v1/instances/sec", json={"agent_api_key": secrets["agent_key"],
                                                         "agent_timeout_s": "bad"}))
    keep(svc.api("PATCH", "/api/v1/instances/sec", json={"agent_api_key": secrets["agent_key"]}))
    url = f"{svc.url}/webhook/evolution/sec"
    ids = []
    r = keep(requests.post(url, json=webhook("sec", "by header"),
                           headers={"x-webhook-secret": secrets["webhook_secret"]}, timeout=10))
    assert r.status_code == 202
    ids.append(r.json()["trace_id"])
    r = keep(requests.post(url + "?token=" + secrets["webhook_secret"], json=webhook("sec", "by query"),
                           timeout=10))
    assert r.status_code == 202
    ids.append(r.json()["trace_id"])
    r = keep(requests.post(url, json=webhook("sec", "#status=401 refused"),
                           headers={"x-webhook-secret": secrets["webhook_secret"]}, timeout=10))
    ids.append(r.json()["trace_id"])
    r = keep(requests.post(url, json=webhook("sec", "#evo_status=500 evo fails"),
                           headers={"x-webhook-secret": secrets["webhook_secret"]}, timeout=10))
    ids.append(r.json()["trace_id"])
    # Wrong secret, secret-like values where they do not belong, malformed bodies.
    assert keep(requests.post(url, json=webhook("sec", "x"), headers={"x-webhook-secret": "nope"},
                              timeout=10)).status_code == 401
    keep(requests.post(url + "?token=" + secrets["webhook_secret"], data=b"{not json",
                       headers={"Content-Type": "application/json"}, timeout=10))
    keep(svc.api("GET", "/api/v1/traces", params={"user_id": secrets["agent_key"][:5]}))
    keep(svc.api("GET", "/api/v1/traces/not-a-uuid"))
    for tid in ids:
        keep(svc.api("GET", f"/api/v1/traces/{tid}"))
        svc.wait_final(tid)
    keep(svc.api("GET", "/api/v1/traces"))
    keep(requests.get(svc.url + "/metrics", timeout=10))
    m = keep(requests.get(svc.url + "/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10))
    assert m.status_code == 200
    keep(requests.get(svc.url + "/health", timeout=10))
    # The agent and Evolution really received their keys (so they were in use).
    calls = requests.get(sandbox.url + "/calls", timeout=10).json()["recent"]
    assert any(c["api_key_present"] and c["session_name"] == "sec_5515551234567" for c in calls)

    time.sleep(1.5)  # let the workers print their last lines
    output = svc.log_path.read_text(errors="replace")
    assert "DEBUG" in output, "the service did not log at DEBUG"
    conn = psycopg2.connect(svc.database_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT row_to_json(t)::text FROM message_trace t")
            trace_text = "\n".join(row[0] for row in cur.fetchall())
    finally:
        conn.close()
    assert trace_text.count('"instance_name" : "sec"') or "sec" in trace_text
    places = {"service output (stdout/stderr, access log)": output, "trace rows": trace_text,
              "answer bodies and headers": "\n".join(bodies), "/metrics": m.text}
    for kind, secret in secrets.items():
        for place, text in places.items():
            assert secret not in text, f"{kind} appears in {place}"


# --------------------------------------------------------------------------- /metrics token


def test_metrics_bearer_token(make_service):
    """With AUTOMAGIK_OMNI_METRICS_TOKEN: 401 without or with a wrong token (counted as
    metrics_token failures), 200 with it; /health stays open."""
    token = "scrape-" + uuid.uuid4().hex
    svc = make_service({"AUTOMAGIK_OMNI_METRICS_TOKEN": token})
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token},
                    {"Authorization": f"Basic {token}"}, {"Authorization": f"Bearer {token}x"}):
        r = requests.get(svc.url + "/metrics", headers=headers, timeout=10)
        assert r.status_code == 401, headers
        assert r.headers["Content-Type"].startswith("application/json") and "error" in r.json()
    r = requests.get(svc.url + "/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 200 and "omni_auth_failures_total" in r.text
    assert metric(parse_metrics(r.text), "omni_auth_failures_total", reason="metrics_token") == 5
    assert requests.get(svc.url + "/health", timeout=10).status_code == 200


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus.scale.yml"])
def test_compose_prometheus_scrapes_with_the_metrics_token(make_service, tmp_path, config):
    """The compose scrape configs, run by a real Prometheus against a service with a token:
    the bearer token read from the secret file gets the scrape in (up == 1, series stored)."""
    from tests.support import Prometheus

    token = "scrape-" + uuid.uuid4().hex
    svc = make_service({"AUTOMAGIK_OMNI_METRICS_TOKEN": token}, workers=1)
    secret = tmp_path / "metrics_token"
    secret.write_text(token + "\n")  # docker writes the secret as given; a newline is tolerated
    prom = Prometheus(f"127.0.0.1:{svc.port}", config=config, token_file=secret)
    try:
        up = prom.wait_for('up{job="omni"} == 1', timeout=20)
        assert up and prom.wait_for('omni_auth_failures_total{reason="metrics_token"} == 0', timeout=20)
    finally:
        prom.stop()


def test_compose_wires_the_metrics_token():
    """omni and Prometheus both read AUTOMAGIK_OMNI_METRICS_TOKEN of .env as the metrics_token
    secret file, which every compose scrape config of omni reads."""
    from tests.system.test_stack_config import COMPOSE_FILES, compose_model

    for which in COMPOSE_FILES:
        model = compose_model(which)
        omni = model["services"]["omni"]
        assert omni["environment"]["AUTOMAGIK_OMNI_METRICS_TOKEN_FILE"] == "/run/secrets/metrics_token"
        assert "AUTOMAGIK_OMNI_METRICS_TOKEN" not in omni["environment"]
        assert model["secrets"]["metrics_token"]["environment"] == "AUTOMAGIK_OMNI_METRICS_TOKEN"
        for service in ("omni", "prometheus"):
            mounts = {m["source"]: m["target"] for m in model["services"][service]["secrets"]}
            assert mounts["metrics_token"] == "/run/secrets/metrics_token", service
    for name in ("prometheus.yml", "prometheus.scale.yml"):
        cfg = yaml.safe_load((ROOT / "prometheus" / name).read_text())
        omni = next(j for j in cfg["scrape_configs"] if j["job_name"] == "omni")
        assert omni["authorization"] == {"credentials_file": "/run/secrets/metrics_token"}, name


# --------------------------------------------------------------------------- webhook rate limits


def _burst(svc, n: int, instance: str, addresses: list[str]) -> list[requests.Response]:
    def one(i: int) -> requests.Response:
        body = webhook(instance, "rate", event="connection.update")  # answered "ignored": no rows
        return requests.post(f"{svc.url}/webhook/evolution/{instance}", json=body,
                             headers={"X-Forwarded-For": addresses[i % len(addresses)]}, timeout=10)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        return list(pool.map(one, range(n)))


def test_webhook_rate_limits_per_address_and_per_instance(make_service, sandbox):
    """AUTOMAGIK_OMNI_WEBHOOK_RATE_PER_ADDRESS / _PER_INSTANCE (per second, per worker): a
    burst over either limit gets 429 with Retry-After naming the limit, counted as
    omni_webhook_rejected_total{reason="rate_limited"}; other addresses are not affected."""
    svc = make_service({"AUTOMAGIK_OMNI_WEBHOOK_RATE_PER_ADDRESS": "5",
                        "AUTOMAGIK_OMNI_WEBHOOK_RATE_PER_INSTANCE": "12",
                        "AUTOMAGIK_OMNI_TRUSTED_PROXIES": "1"})
    svc.ensure_instance("rl", sandbox.url)
    before = metric(_metrics(svc), "omni_webhook_rejected_total", reason="rate_limited")
    t0 = time.monotonic()
    burst = _burst(svc, 16, "rl", ["192.0.2.1"])
    fast = time.monotonic() - t0 < 0.9  # the bound below holds when the burst fits one window
    codes = [r.status_code for r in burst]
    first_429 = codes.count(429)
    assert set(codes) <= {200, 429} and 429 in codes, codes
    if fast:
        assert codes.count(200) <= 10, codes  # 5 per worker
    for r in burst:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) == 1
            assert r.json()["error"] == "too many webhooks from this address"
    ok = requests.post(f"{svc.url}/webhook/evolution/rl", json=webhook("rl", "x", event="connection.update"),
                       headers={"X-Forwarded-For": "192.0.2.2"}, timeout=10)
    assert ok.status_code == 200
    time.sleep(1.1)
    burst = _burst(svc, 40, "rl", [f"198.51.100.{i}" for i in range(1, 41)])
    codes = [r.status_code for r in burst]
    assert 429 in codes, codes
    assert {r.json()["error"] for r in burst if r.status_code == 429} == {"too many webhooks for instance rl"}
    rejected = metric(_metrics(svc), "omni_webhook_rejected_total", reason="rate_limited") - before
    assert rejected == first_429 + codes.count(429)


# --------------------------------------------------------------------------- deployment exposure


class _ComposeLoader(yaml.SafeLoader):
    """YAML with compose's merge tags (!reset, !override) read as plain values."""


for _tag in ("!reset", "!override"):
    _ComposeLoader.add_constructor(_tag, lambda loader, node: (
        loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode)
        else loader.construct_mapping(node) if isinstance(node, yaml.MappingNode)
        else loader.construct_scalar(node)))


def _compose(name: str) -> dict:
    return yaml.load((ROOT / name).read_text(), Loader=_ComposeLoader)


SECRET_NAME = re.compile(r"PASSWORD|SECRET|API_KEY|TOKEN", re.I)


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.scale.yml"])
def test_compose_publishes_only_on_loopback_and_never_postgres(name):
    """Every published port is bound to 127.0.0.1; PostgreSQL is not published at all."""
    services = _compose(name)["services"]
    for svc_name, svc in services.items():
        ports = svc.get("ports") or []
        if svc_name == "postgres":
            assert not ports, "PostgreSQL must not be published on the host"
        for port in ports:
            spec = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port.get('published')}"
            assert spec.startswith("127.0.0.1:"), f"{name}: {svc_name} publishes {spec} beyond loopback"


def test_no_default_passwords():
    """Every secret in the compose files is ${VAR:?...} (compose names it when missing), never
    ${VAR:-default} or a literal; a *_FILE variable names a mounted secret file; .env.example
    carries only `change-me` placeholders that scripts/gen-env.sh replaces (or values built
    from them); provisioning reads secrets from the environment or a secret file."""
    for name in ("docker-compose.yml", "docker-compose.scale.yml"):
        text = (ROOT / name).read_text()
        for var, op in re.findall(r"\$\{([A-Z0-9_]+)(:?[-?]?)", text):
            if SECRET_NAME.search(var):
                assert op == ":?", f"{name}: ${{{var}}} must be ${{{var}:?...}}"
        for svc_name, svc in _compose(name)["services"].items():
            env = svc.get("environment") or {}
            items = env.items() if isinstance(env, dict) else (e.split("=", 1) for e in env)
            for key, value in items:
                if SECRET_NAME.search(key) and key != "GF_SECURITY_ADMIN_USER":
                    if key.endswith("_FILE"):
                        assert str(value).startswith("/run/secrets/"), f"{name}: {svc_name}.{key}"
                        continue
                    assert "${" in str(value), f"{name}: {svc_name}.{key} is a literal secret"
    for line in (ROOT / ".env.example").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            if SECRET_NAME.search(key):
                assert value == "change-me", f".env.example: {key} must be the change-me placeholder"
            if "://" in value and "@" in value:
                # A URL with credentials takes them from a placeholder variable.
                assert re.search(r"://[^:/@]+:\$\{[A-Z_]*PASSWORD\}@", value), f".env.example: {key}"
    for path in (ROOT / "grafana" / "provisioning").rglob("*.yml"):
        for m in re.finditer(r"(?im)^\s*(password|secret|token)\s*:\s*(\S+)", path.read_text()):
            assert m.group(2).startswith("$"), f"{path}: literal {m.group(1)}"
