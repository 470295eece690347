"""Bad input: schemathesis driven by app/openapi.json over every endpoint of a
running service, with and without a valid key, then hand-written hostile inputs: SQL
injection in every filter and path parameter, invalid UUIDs, dates and numbers out of range,
deeply nested and huge JSON, wrong content types, non-UTF-8 bytes, oversized headers.
"""
from __future__ import annotations

import concurrent.futures
import glob
import json
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import psycopg2
import pytest
import requests

from tests.support import API_KEY, PYTHON, webhook

ST = str(Path(PYTHON).parent / "st")
MAX_EXAMPLES = 30
# Checks: every one schemathesis has, except two whose premise this API cannot meet:
# - positive_data_acceptance: a schema-valid `cursor` is still an opaque token only the API
#   can mint, and dates before 1970 are refused by design (both answer 400 by contract);
# - negative_data_rejection: JSON-schema's "uri" format is stricter than the service's URL
#   check (it accepts internationalised host names such as https://ï), which is harmless.
EXCLUDED_CHECKS = "positive_data_acceptance,negative_data_rejection"
AST_RACE = "AST constructor recursion depth mismatch"


def _count(url: str, table: str) -> int:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {table}")
            return cur.fetchone()[0]
    finally:
        conn.close()


def _schemathesis(svc, tmp_path: Path, label: str, headers: list[str]) -> dict:
    report = tmp_path / label
    argv = [ST, "run", f"{svc.url}/openapi.json", *headers, "--checks", "all",
            "--exclude-checks", EXCLUDED_CHECKS, "--max-examples", str(MAX_EXAMPLES),
            "--generation-deterministic", "--phases", "examples,coverage,fuzzing",
            "--workers", "2", "--request-timeout", "20", "--no-color",
            "--report", "json", "--report-dir", str(report)]
    # cwd: schemathesis keeps a .schemathesis/ cache in its working directory, not in the repo.
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    if AST_RACE in proc.stdout:
        # CPython 3.11.7's ast.parse is not thread-safe (gh-106905): hypothesis describing a
        # strategy in one of schemathesis' worker threads can crash with this SystemError, an
        # interpreter fault, not a finding. Run once more from scratch.
        shutil.rmtree(report, ignore_errors=True)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    files = glob.glob(str(report / "json-*.json"))
    assert files, proc.stdout[-3000:] + proc.stderr[-2000:]
    data = json.loads(Path(files[0]).read_text())
    assert proc.returncode == 0 and not data["failures"] and not data["errors"], \
        proc.stdout[-8000:]
    assert data["operations"]["tested"] == data["operations"]["total"] == 13
    return data


def test_schemathesis_with_and_without_key(make_service, tmp_path, capsys):
    """Every operation of app/openapi.json, fuzzed (deterministic, 30 examples per operation
    and phase): no 5xx, every status code, content type, header and body conforms to the
    document; without a key every /api/v1 answer is a documented 401. The failed-attempt
    limiter is raised for this service so the run is not cut short by 429s."""
    svc = make_service({"AUTOMAGIK_OMNI_AUTH_FAILURES_PER_MINUTE": "1000000"})
    svc.ensure_instance("fuzz", svc.sandbox.url)
    with_key = _schemathesis(svc, tmp_path, "with-key", ["--header", f"x-api-key: {API_KEY}"])
    without = _schemathesis(svc, tmp_path, "without-key", [])
    # The service still works end to end and its trace table takes new rows: on an instance
    # the fuzzer never saw (it may have deleted or changed `fuzz`), a webhook is accepted,
    # writes exactly one row and completes.
    assert requests.get(svc.url + "/health", timeout=5).status_code == 200
    name = "after-" + uuid.uuid4().hex[:8]
    svc.ensure_instance(name, svc.sandbox.url)
    before = _count(svc.database_url, "message_trace")
    r = svc.send(name, "after fuzzing")
    assert r.status_code == 202, r.text
    assert svc.wait_final(r.json()["trace_id"])["status"] == "completed"
    assert _count(svc.database_url, "message_trace") == before + 1
    with capsys.disabled():
        print(f"\n[schemathesis] cases run: with key {with_key['test_cases']['generated']}, "
              f"without key {without['test_cases']['generated']}, failures 0")


# --------------------------------------------------------------------------- hand-written

SQLI = ["' OR '1'='1", "'; DROP TABLE message_trace; --", "1; DELETE FROM instance",
        "\" OR \"\"=\"", "bot' UNION SELECT * FROM instance --", "%' OR 1=1 --",
        "1)) OR pg_sleep(5) --", "$$; DROP TABLE instance; $$", "\\x27 OR 1=1"]
TRACE_FILTERS = ["instance_name", "status", "user_id", "min_duration", "max_duration",
                 "start_date", "end_date", "failed_step", "message_type", "limit", "cursor"]
ANALYTICS_FILTERS = ["start_date", "end_date", "instance_name", "interval", "top"]


@pytest.fixture()
def counts(service):
    """Rows in both tables before the test; the test asserts nothing was written."""
    before = (_count(service.database_url, "message_trace"), _count(service.database_url, "instance"))
    yield before
    assert (_count(service.database_url, "message_trace"),
            _count(service.database_url, "instance")) == before


def _clear_4xx(r: requests.Response, *codes: int) -> dict:
    assert r.status_code in codes, (r.status_code, r.text[:300])
    assert r.headers["Content-Type"].startswith("application/json"), r.headers
    body = r.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    assert "Traceback" not in r.text
    return body


def test_sql_injection_in_every_filter_and_path_parameter(service, counts):
    """Each injection string in each filter: 400 naming the parameter, or 200 with an empty
    list (string filters are bound parameters); in each path parameter: 400 or 404. The
    tables survive and nothing is written."""
    for value in SQLI:
        for name in TRACE_FILTERS:
            r = service.api("GET", "/api/v1/traces", params={name: value})
            if r.status_code == 200:
                assert name in ("instance_name", "user_id", "message_type") and r.json() == [], (name, value)
            else:
                assert _clear_4xx(r, 400)["detail"]["parameter"] == name
        for name in ANALYTICS_FILTERS:
            r = service.api("GET", "/api/v1/traces/analytics", params={name: value})
            if r.status_code == 200:
                assert name == "instance_name" and r.json()["total"] == 0
            else:
                assert _clear_4xx(r, 400)["detail"]["parameter"] == name
        r = service.api("DELETE", "/api/v1/traces", params={"older_than_days": value})
        assert _clear_4xx(r, 400)["detail"]["parameter"] == "older_than_days"
        r = service.api("DELETE", "/api/v1/traces", params={"older_than_days": "36500", "dry_run": value})
        assert _clear_4xx(r, 400)["detail"]["parameter"] == "dry_run"
        quoted = requests.utils.quote(value, safe="")
        _clear_4xx(service.api("GET", f"/api/v1/traces/{quoted}"), 400, 404)
        for method in ("GET", "DELETE"):
            _clear_4xx(service.api(method, f"/api/v1/instances/{quoted}"), 404)
        _clear_4xx(service.api("PATCH", f"/api/v1/instances/{quoted}", json={"enabled": False}), 404)
        r = requests.post(f"{service.url}/webhook/evolution/{quoted}", json=webhook(value, "hi"), timeout=10)
        _clear_4xx(r, 404)
        # Injection inside the body of a known instance's webhook is just text.
        body = webhook("bot", value)
        body["data"]["key"]["remoteJid"] = value
        _clear_4xx(requests.post(f"{service.url}/webhook/evolution/bot", json=body, timeout=10), 400)
        _clear_4xx(service.api("POST", "/api/v1/instances", json={
            "name": value, "agent_api_url": value, "evolution_url": value}), 400)
    assert service.api("GET", "/api/v1/traces", params={"limit": 1}).status_code == 200


@pytest.mark.parametrize("path,params,parameter", [
    ("/api/v1/traces/not-a-uuid", {}, "trace_id"),
    ("/api/v1/traces/123e4567-e89b-12d3-a456-42661417400", {}, "trace_id"),
    ("/api/v1/traces/123e4567-e89b-12d3-a456-4266141740000", {}, "trace_id"),
    ("/api/v1/traces/%00", {}, "trace_id"),
    ("/api/v1/traces", {"start_date": "0000-01-01T00:00:00Z"}, "start_date"),
    ("/api/v1/traces", {"start_date": "1969-12-31T23:59:59Z"}, "start_date"),
    ("/api/v1/traces", {"end_date": "10000-01-01"}, "end_date"),
    ("/api/v1/traces", {"end_date": "2025-13-40"}, "end_date"),
    ("/api/v1/traces", {"end_date": "0001-01-01T00:00:00+14:00"}, "end_date"),
    ("/api/v1/traces", {"limit": "0"}, "limit"),
    ("/api/v1/traces", {"limit": "1001"}, "limit"),
    ("/api/v1/traces", {"limit": "-1"}, "limit"),
    ("/api/v1/traces", {"limit": "1e3"}, "limit"),
    ("/api/v1/traces", {"limit": "NaN"}, "limit"),
    ("/api/v1/traces", {"min_duration": str(2**31)}, "min_duration"),
    ("/api/v1/traces", {"max_duration": "9" * 400}, "max_duration"),
    ("/api/v1/traces", {"min_duration": "-5"}, "min_duration"),
    ("/api/v1/traces", {"instance_name": "x" * 257}, "instance_name"),
    ("/api/v1/traces", {"user_id": ""}, "user_id"),
    ("/api/v1/traces", {"user_id": "a\x00b"}, "user_id"),
    ("/api/v1/traces", {"cursor": "!!!"}, "cursor"),
    ("/api/v1/traces", {"cursor": "W10"}, "cursor"),
    ("/api/v1/traces/analytics", {"top": "0"}, "top"),
    ("/api/v1/traces/analytics", {"top": "101"}, "top"),
    ("/api/v1/traces/analytics", {"interval": "year"}, "interval"),
    ("/api/v1/traces/analytics", {"start_date": "yesterday"}, "start_date"),
])
def test_out_of_range_values_are_400_naming_the_parameter(service, counts, path, params, parameter):
    """Invalid UUIDs, dates and numbers out of range: 400 naming the parameter."""
    body = _clear_4xx(service.api("GET", path, params=params), 400)
    assert body["detail"]["parameter"] == parameter, body


def test_delete_traces_out_of_range(service, counts):
    for days in ("-1", "36501", "", "1.5"):
        r = service.api("DELETE", "/api/v1/traces", params={"older_than_days": days})
        assert _clear_4xx(r, 400)["detail"]["parameter"] == "older_than_days"
    assert _clear_4xx(service.api("DELETE", "/api/v1/traces"), 400)["detail"]["parameter"] == "older_than_days"


def _post_raw(service, path: str, data: bytes, content_type: str | None, key: bool = True):
    headers = {"Content-Type": content_type} if content_type else {}
    if key:
        headers["x-api-key"] = service.api_key
    return requests.post(service.url + path, data=data, headers=headers, timeout=30)


BODY_PATHS = ["/webhook/evolution/bot", "/api/v1/instances"]


@pytest.mark.parametrize("path", BODY_PATHS)
def test_hostile_bodies(service, counts, path):
    """Deeply nested (100 000 arrays) and huge JSON, wrong content types, non-UTF-8 bytes,
    empty and truncated bodies: each a clear 4xx, nothing written."""
    deep = b"[" * 100_000 + b"]" * 100_000
    deep_obj = b'{"event": ' + b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b"}"
    assert "body" in _clear_4xx(_post_raw(service, path, deep, "application/json"), 400)["error"]
    _clear_4xx(_post_raw(service, path, deep_obj, "application/json"), 400)
    huge = json.dumps({"event": "messages.upsert", "pad": "x" * (2 << 20)}).encode()
    assert "too large" in _clear_4xx(_post_raw(service, path, huge, "application/json"), 413)["error"]
    many = json.dumps([{"k": i} for i in range(200_000)]).encode()  # > 1 MiB of small values
    _clear_4xx(_post_raw(service, path, many, "application/json"), 413)
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                  "application/xml", None):
        body = _clear_4xx(_post_raw(service, path, json.dumps(webhook("bot", "hi")).encode(), ctype), 415)
        assert "Content-Type" in body["error"]
    for raw in (b"\xff\xfe\xfd", b'{"event": "messages.upsert", "x": "\xc3\x28"}', b"", b"{", b"null",
                b"\x00" * 16, "{\"event\": \"\ud800\"}".encode("utf-8", "surrogatepass")):
        _clear_4xx(_post_raw(service, path, raw, "application/json"), 400)


def _raw_http(port: int, request: bytes) -> int:
    """Send raw bytes; return the HTTP status of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1])


def test_headers_over_limits_are_4xx(service, counts):
    """gunicorn's limits answer 4xx before the app: a request line over 8190 bytes, a header
    over 8190 bytes, more than 100 headers, and a malformed request line."""
    port = service.port
    long_line = b"GET /api/v1/traces?x=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    assert 400 <= _raw_http(port, long_line) < 500
    big_header = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"
    assert 400 <= _raw_http(port, big_header) < 500
    many = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n"
    assert 400 <= _raw_http(port, many) < 500
    assert 400 <= _raw_http(port, b"GARBAGE\r\n\r\n") < 500
    big_key = "k" * 9000
    r = requests.get(service.url + "/api/v1/traces", headers={"x-api-key": big_key}, timeout=10)
    assert 400 <= r.status_code < 500
    # The service is fine afterwards.
    assert requests.get(service.url + "/health", timeout=5).status_code == 200


def test_lone_surrogate_escapes_are_400_and_do_not_break_the_writer(service):
    """Valid-looking JSON with unpaired \\ud800 escapes (in the text, the message id or an
    instance field) is a 400; before the fix one such webhook killed the worker's trace
    writer and every later webhook on that worker waited 10 s for a 503."""
    raw = json.dumps(webhook("bot", "hi PLACEHOLDER", message_id="SURR-PLACEHOLDER"))
    for i in range(6):
        for body in (raw.replace("hi PLACEHOLDER", "hi \\ud800"),
                     raw.replace("SURR-PLACEHOLDER", "SURR-\\udfff%d" % i)):
            r = requests.post(f"{service.url}/webhook/evolution/bot", data=body.encode(),
                              headers={"Content-Type": "application/json"}, timeout=15)
            assert "surrogate" in _clear_4xx(r, 400)["error"]
    r = service.api("POST", "/api/v1/instances", data=b'{"name": "s", "agent_api_url": "http://x", '
                    b'"evolution_url": "http://x", "agent_api_key": "\\ud800abcdef"}',
                    headers={"Content-Type": "application/json"})
    _clear_4xx(r, 400)
    # A valid pair (an emoji written as escapes) is fine, and nothing is stuck afterwards.
    emoji = json.dumps(webhook("bot", "PAIR"))
    assert json.loads(emoji.replace("PAIR", "\\ud83d\\ude00"))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: service.send("bot", f"still fine {i}"), range(12)))
    assert all(a.status_code == 202 and a.elapsed.total_seconds() < 5 for a in answers)
    for a in answers:
        service.wait_final(a.json()["trace_id"])
