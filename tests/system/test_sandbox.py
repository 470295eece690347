"""Tests of the demo sandbox (demo.sandbox) and the load generator (demo.loadgen).

The sandbox runs for real as a subprocess on a free 127.0.0.1 port; the load
generator runs against a tiny in-test stub of the gateway.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import aiohttp
import pytest
import requests
from aiohttp import web

from demo import loadgen, sandbox
from tests.support import JsonHandler, LocalHTTPServer

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-gateway-key"


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The current environment without SANDBOX_* settings, plus extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_")}
    env.update(extra)
    return env


def wait_for_health(url: str, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Poll url/health until it answers 200 or the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sandbox exited early with {proc.returncode}")
        try:
            if requests.get(f"{url}/health", timeout=0.5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    raise RuntimeError("sandbox did not become healthy")


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM the process we started, SIGKILL it if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture(scope="module")
def sandbox_url():
    """A real sandbox subprocess with the default (instant) latency model."""
    port = free_port()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "-m", "demo.sandbox", "--port", str(port)],
                                cwd=ROOT, env=clean_env(), stdout=log, stderr=log)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for_health(url, proc)
            yield url
        finally:
            stop_process(proc)


def agent_run(url: str, text: str, sse: bool = False, **kwargs) -> requests.Response:
    """POST one agent run like the gateway does."""
    body = {"message_content": text, "user_id": "whatsapp:+5511999990000",
            "session_name": "demo_5511999990000", "message_type": "text",
            "session_origin": "whatsapp", "stream": sse}
    return requests.post(f"{url}/api/v1/agent/default/run", json=body,
                         headers={"x-api-key": "k"}, **kwargs)


def send_text(url: str, text: str, number: str = "5511999990000") -> requests.Response:
    """POST one Evolution sendText like the gateway does."""
    return requests.post(f"{url}/message/sendText/demo", json={"number": number, "text": text},
                         headers={"apikey": "evo-key"}, timeout=5)


# ---------------------------------------------------------------- sandbox over HTTP


def test_health(sandbox_url):
    resp = requests.get(f"{sandbox_url}/health", timeout=5)
    assert resp.status_code == 200 and resp.json() == {"status": "ok"}


def test_agent_reply_echoes_directives(sandbox_url):
    text = "What can you do? #evo_status=500 #delay=1"
    resp = agent_run(sandbox_url, text, timeout=5)
    assert resp.status_code == 200
    body = resp.json()
    assert "#evo_status=500" in body["message"] and "#delay=1" in body["message"]
    assert text in body["message"]
    assert body["success"] is True
    assert body["session_id"] == "demo_5511999990000"
    assert isinstance(body["usage"]["request_tokens"], int)
    assert isinstance(body["usage"]["response_tokens"], int)


def test_delay_directive_and_concurrency(sandbox_url):
    started = time.monotonic()
    assert agent_run(sandbox_url, "slow #delay=300", timeout=5).status_code == 200
    assert time.monotonic() - started >= 0.3

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=50) as pool:
        replies = list(pool.map(lambda i: agent_run(sandbox_url, f"m{i} #delay=300", timeout=10),
                                range(50)))
    elapsed = time.monotonic() - started
    assert all(r.status_code == 200 for r in replies)
    # Serially this would take 15 s; concurrent handling keeps it near 0.3 s.
    assert elapsed < 3.0


def test_status_directive(sandbox_url):
    resp = agent_run(sandbox_url, "hello #status=401", timeout=5)
    assert resp.status_code == 401
    assert "error" in resp.json()
    assert agent_run(sandbox_url, "boom #status=503", timeout=5).status_code == 503


def test_evo_status_directive_is_not_an_agent_status(sandbox_url):
    assert agent_run(sandbox_url, "x #evo_status=500", timeout=5).status_code == 200


def test_evolution_send(sandbox_url):
    requests.delete(f"{sandbox_url}/sent", timeout=5)
    ok = send_text(sandbox_url, "Echo: hi")
    assert ok.status_code == 201
    assert ok.json()["status"] == "PENDING" and ok.json()["key"]["id"]
    failed = send_text(sandbox_url, "Echo: hi #evo_status=500")
    assert failed.status_code == 500 and "error" in failed.json()
    sent = requests.get(f"{sandbox_url}/sent", timeout=5).json()
    assert [s["status"] for s in sent] == [500, 201]
    newest = sent[0]
    assert newest["instance"] == "demo" and newest["number"] == "5511999990000"
    assert newest["apikey_present"] is True
    assert newest["received_at"].endswith("Z")


def test_evo_fail_first_directive(sandbox_url):
    """#evo_fail_first=2: the first two sends of that exact text answer 503, then 201; the
    same directive in another text has its own count."""
    text = f"Echo: blip #evo_fail_first=2 {uuid.uuid4().hex}"
    assert [send_text(sandbox_url, text).status_code for _ in range(4)] == [503, 503, 201, 201]
    assert send_text(sandbox_url, text + " other").status_code == 503
    assert sandbox.parse_directives("x #evo_fail_first=3").evo_fail_first == 3


def test_sent_newest_first_and_clear(sandbox_url):
    requests.delete(f"{sandbox_url}/sent", timeout=5)
    for i in range(5):
        send_text(sandbox_url, f"Echo: {i}")
    texts = [s["text"] for s in requests.get(f"{sandbox_url}/sent", timeout=5).json()]
    assert texts == [f"Echo: {i}" for i in reversed(range(5))]
    assert requests.delete(f"{sandbox_url}/sent", timeout=5).status_code == 200
    assert requests.get(f"{sandbox_url}/sent", timeout=5).json() == []


def test_alerts_newest_first_and_clear(sandbox_url):
    requests.delete(f"{sandbox_url}/alerts", timeout=5)
    for i in range(3):
        resp = requests.post(f"{sandbox_url}/alerts", json={"status": "firing", "n": i}, timeout=5)
        assert resp.status_code == 200
    alerts = requests.get(f"{sandbox_url}/alerts", timeout=5).json()
    assert [a["body"]["n"] for a in alerts] == [2, 1, 0]
    assert all(a["received_at"].endswith("Z") for a in alerts)
    requests.delete(f"{sandbox_url}/alerts", timeout=5)
    assert requests.get(f"{sandbox_url}/alerts", timeout=5).json() == []


def test_streaming_sse_format(sandbox_url):
    text = "stream me please #evo_status=502"
    resp = agent_run(sandbox_url, text, sse=True, timeout=5)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    raw = resp.content.decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")[:-1]
    assert events[-1] == "data: [DONE]"
    chunks = []
    for event in events[:-2]:
        assert re.fullmatch(r"data: \{.*\}", event)
        payload = json.loads(event[len("data: "):])
        assert list(payload) == ["content"]
        chunks.append(payload["content"])
    assert 3 <= len(chunks) <= 5
    assert "".join(chunks) == f"Echo: {text}"
    # The usage event comes last, before [DONE], counted from the text.
    usage = json.loads(events[-2][len("data: "):])
    assert usage == {"usage": {"request_tokens": len(text) // 4, "response_tokens": len(f"Echo: {text}") // 4},
                     "session_id": "demo_5511999990000"}


@pytest.mark.parametrize("form,keys", [
    ("request", ("request_tokens", "response_tokens")), ("prompt", ("prompt_tokens", "completion_tokens")),
    ("input", ("input_tokens", "output_tokens")), ("none", None)])
def test_usage_directive_picks_the_form(sandbox_url, form, keys):
    text = f"count me #usage={form}"
    body = agent_run(sandbox_url, text, timeout=5).json()
    events = agent_run(sandbox_url, text, sse=True, timeout=5).content.decode().split("\n\n")[:-1]
    streamed = [json.loads(e[len("data: "):]) for e in events[:-1]]
    if keys is None:
        assert "usage" not in body and not any("usage" in e for e in streamed)
        return
    want = {keys[0]: len(text) // 4, keys[1]: len(f"Echo: {text}") // 4}
    assert body["usage"] == want
    assert streamed[-1]["usage"] == want


def test_calls_counts(sandbox_url):
    requests.delete(f"{sandbox_url}/calls", timeout=5)
    agent_run(sandbox_url, "one", timeout=5)
    agent_run(sandbox_url, "two #status=500", timeout=5)
    calls = requests.get(f"{sandbox_url}/calls", timeout=5).json()
    assert calls["total"] == 2
    assert calls["by_status"] == {"200": 1, "500": 1}
    assert calls["recent"][0]["message_content"] == "two #status=500"


def test_fault_directives(sandbox_url):
    garbage = agent_run(sandbox_url, "x #garbage", timeout=5)
    assert garbage.status_code == 200
    with pytest.raises(ValueError):
        garbage.json()

    with pytest.raises(requests.Timeout):
        agent_run(sandbox_url, "x #hang", timeout=0.5)

    # requests' own stream=True leaves the endless body unread until we iterate it.
    with agent_run(sandbox_url, "x #endless", sse=True, stream=True, timeout=5) as resp:
        lines = []
        for line in resp.iter_lines():
            if line:
                lines.append(line.decode())
            if len(lines) == 3:
                break
    assert all(line.startswith('data: {"content"') for line in lines)
    # The sandbox is still responsive after clients gave up on hung streams.
    assert requests.get(f"{sandbox_url}/health", timeout=2).status_code == 200


@pytest.mark.parametrize("name,value", [("SANDBOX_SLOW_RATE", "abc"),
                                        ("SANDBOX_FAIL_RATE", "1.5"),
                                        ("SANDBOX_RECEIPT_SHARE", "2"),
                                        ("SANDBOX_WEBHOOK_URL", "ftp://x"),
                                        ("SANDBOX_PORT", "99999"),
                                        ("SANDBOX_LATENCY_MEDIAN_MS", "-5")])
def test_bad_env_value_is_an_error(name, value):
    proc = subprocess.run([sys.executable, "-m", "demo.sandbox", "--port", str(free_port())],
                          cwd=ROOT, env=clean_env(**{name: value}),
                          capture_output=True, text=True, timeout=10)
    assert proc.returncode != 0
    assert name in proc.stderr


@pytest.mark.parametrize("number,remote_jid", [
    ("5511999990000", "5511999990000@s.whatsapp.net"),
    ("5511999990000@s.whatsapp.net", "5511999990000@s.whatsapp.net"),
    ("103899771998284@lid", "103899771998284@lid"),
])
def test_send_text_answers_like_evolution(sandbox_url, number, remote_jid):
    requests.delete(f"{sandbox_url}/sent", timeout=5)
    resp = send_text(sandbox_url, "Echo: hi", number=number)
    assert resp.status_code == 201
    body = resp.json()
    assert body["key"]["remoteJid"] == remote_jid and body["key"]["fromMe"] is True
    assert re.fullmatch(r"3EB0[0-9A-F]{16}", body["key"]["id"])
    assert body["status"] == "PENDING" and body["pushName"] == ""
    assert body["message"] == {"conversation": "Echo: hi"}
    assert body["messageType"] == "conversation" and body["source"] == "unknown"
    assert isinstance(body["messageTimestamp"], int) and abs(body["messageTimestamp"] - time.time()) < 60
    uuid.UUID(body["instanceId"])
    sent = requests.get(f"{sandbox_url}/sent", timeout=5).json()[0]
    assert sent["message_id"] == body["key"]["id"] and sent["number"] == number
    assert sent["remote_jid"] == remote_jid


@pytest.mark.parametrize("number", ["", "abc", "+5511999990000", "٥٥١١", "5511@g.us", "@lid", "55 11",
                                    "5511@s.whatsapp.net.evil", None, True, 5.5, ["551"]])
def test_send_text_refuses_junk_numbers(sandbox_url, number):
    resp = requests.post(f"{sandbox_url}/message/sendText/demo",
                         json={"number": number, "text": "x"}, timeout=5)
    assert resp.status_code == 400 and "error" in resp.json()
    sent = requests.get(f"{sandbox_url}/sent", timeout=5).json()[0]
    assert sent["status"] == 400 and sent["message_id"] is None


class ReceiptSink(LocalHTTPServer):
    """A stand-in for the gateway's webhook that records receipts and answers `status`."""

    daemon_threads = True

    def __init__(self, status: int = 200) -> None:
        super().__init__(("127.0.0.1", 0), ReceiptHandler)
        self.status = status
        self.lock = threading.Lock()
        self.got: list[dict] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/webhook/evolution"

    def wait_for(self, count: int, timeout: float = 10.0) -> list[dict]:
        """The first `count` requests, waiting for them."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if len(self.got) >= count:
                    return list(self.got)
            assert time.monotonic() < deadline, f"only {len(self.got)} of {count} receipts"
            time.sleep(0.02)


class ReceiptHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        sink: ReceiptSink = self.server
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with sink.lock:
            sink.got.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                             "body": json.loads(raw), "at": time.monotonic()})
        data = b'{"status": "recorded"}'
        self.send_response(sink.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture()
def receipt_box(request):
    """A sandbox started with the given SANDBOX_* settings; yields (url, proc)."""
    procs = []

    def start(**env: str) -> str:
        port = free_port()
        log = tempfile.TemporaryFile()
        proc = subprocess.Popen([sys.executable, "-m", "demo.sandbox", "--port", str(port)],
                                cwd=ROOT, env=clean_env(**env), stdout=log, stderr=log)
        procs.append((proc, log))
        url = f"http://127.0.0.1:{port}"
        wait_for_health(url, proc)
        return url

    yield start
    for proc, log in procs:
        stop_process(proc)
        log.close()


def test_receipts_delivered_then_read(receipt_box):
    with ReceiptSink() as sink:
        url = receipt_box(SANDBOX_WEBHOOK_URL=sink.url, SANDBOX_WEBHOOK_TOKEN="hook-secret",
                          SANDBOX_RECEIPT_DELAY_MS="100", SANDBOX_READ_DELAY_MS="300",
                          SANDBOX_READ_SHARE="1")
        started = time.monotonic()
        resp = requests.post(f"{url}/message/sendText/whatsapp-bot",
                             json={"number": "103899771998284@lid", "text": "Echo: hi"}, timeout=5)
        assert resp.status_code == 201
        sent = resp.json()
        ack, read = sink.wait_for(2)
        time.sleep(0.3)
        assert len(sink.got) == 2, "one DELIVERY_ACK and one READ per send"
    assert ack["path"] == read["path"] == "/webhook/evolution/whatsapp-bot"
    assert ack["headers"]["x-webhook-secret"] == "hook-secret"
    assert ack["at"] - started >= 0.1 and read["at"] - ack["at"] >= 0.3
    for got, status in ((ack, "DELIVERY_ACK"), (read, "READ")):
        body = got["body"]
        assert set(body) == {"event", "instance", "data", "destination", "date_time", "sender",
                             "server_url", "apikey"}
        assert body["event"] == "messages.update" and body["instance"] == "whatsapp-bot"
        assert body["destination"] == f"{sink.url}/whatsapp-bot"
        assert body["sender"] == "103899771998284@lid" and body["apikey"] is None
        assert body["server_url"] == "http://sandbox:8890"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", body["date_time"])
        data = body["data"]
        assert set(data) == {"keyId", "remoteJid", "fromMe", "participant", "status",
                             "instanceId", "messageId"}
        assert data["keyId"] == sent["key"]["id"] and data["remoteJid"] == sent["key"]["remoteJid"]
        assert data["fromMe"] is True and data["participant"] is None
        assert data["status"] == status and data["instanceId"] == sent["instanceId"]
        assert re.fullmatch(r"cm[a-z0-9]{23}", data["messageId"])
    assert ack["body"]["data"]["messageId"] != read["body"]["data"]["messageId"]
    receipts = requests.get(f"{url}/receipts", timeout=5).json()
    assert [(r["status"], r["answer_status"], r["key_id"]) for r in receipts] == [
        ("READ", 200, sent["key"]["id"]), ("DELIVERY_ACK", 200, sent["key"]["id"])]
    assert requests.delete(f"{url}/receipts", timeout=5).status_code == 200
    assert requests.get(f"{url}/receipts", timeout=5).json() == []


def test_receipts_retry_5xx_not_4xx(receipt_box):
    with ReceiptSink(status=503) as sink:
        url = receipt_box(SANDBOX_WEBHOOK_URL=sink.url, SANDBOX_RECEIPT_DELAY_MS="0",
                          SANDBOX_READ_SHARE="0")
        assert send_text(url, "Echo: retried").status_code == 201
        got = sink.wait_for(sandbox.RECEIPT_ATTEMPTS, timeout=15)
        assert {g["body"]["data"]["keyId"] for g in got} == {got[0]["body"]["data"]["keyId"]}
        deadline = time.monotonic() + 10
        while not (receipts := requests.get(f"{url}/receipts", timeout=5).json()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert receipts[0]["attempts"] == sandbox.RECEIPT_ATTEMPTS
        assert receipts[0]["answer_status"] == 503
        assert len(sink.got) == sandbox.RECEIPT_ATTEMPTS, "bounded retries"

        sink.status = 401
        with sink.lock:
            sink.got.clear()
        assert send_text(url, "Echo: refused").status_code == 201
        sink.wait_for(1)
        time.sleep(1.0)  # longer than the first backoff: a retry would have come
        assert len(sink.got) == 1
        assert requests.get(f"{url}/receipts", timeout=5).json()[0]["answer_status"] == 401


def test_receipts_off_without_url_or_share(receipt_box):
    with ReceiptSink() as sink:
        none_url = receipt_box(SANDBOX_RECEIPT_DELAY_MS="0")
        zero_url = receipt_box(SANDBOX_WEBHOOK_URL=sink.url, SANDBOX_RECEIPT_SHARE="0",
                               SANDBOX_RECEIPT_DELAY_MS="0")
        for url in (none_url, zero_url):
            for i in range(5):
                assert send_text(url, f"Echo: {i}").status_code == 201
        # A failed send is no message: nothing to receipt either.
        read_url = receipt_box(SANDBOX_WEBHOOK_URL=sink.url, SANDBOX_RECEIPT_DELAY_MS="0")
        assert send_text(read_url, "Echo: x #evo_status=500").status_code == 500
        time.sleep(0.5)
        assert sink.got == []
    for url in (none_url, zero_url, read_url):
        assert requests.get(f"{url}/receipts", timeout=5).json() == []


def test_read_share_picks_some_reads(receipt_box):
    with ReceiptSink() as sink:
        url = receipt_box(SANDBOX_WEBHOOK_URL=sink.url, SANDBOX_RECEIPT_DELAY_MS="0",
                          SANDBOX_READ_DELAY_MS="0", SANDBOX_READ_SHARE="0.5", SANDBOX_SEED="4")
        for i in range(40):
            assert send_text(url, f"Echo: {i}").status_code == 201
        sink.wait_for(40)
        time.sleep(0.5)
        statuses = Counter(g["body"]["data"]["status"] for g in sink.got)
    assert statuses["DELIVERY_ACK"] == 40 and 8 <= statuses["READ"] <= 32


def test_receipt_config_from_env():
    cfg = sandbox.config_from_env({})
    assert cfg.webhook_url == "" and cfg.webhook_token == ""
    assert (cfg.receipt_delay_ms, cfg.read_delay_ms, cfg.receipt_share, cfg.read_share) == \
        (300, 1500, 1.0, 0.8)
    cfg = sandbox.config_from_env({"SANDBOX_WEBHOOK_URL": "http://omni:8882/webhook/evolution/",
                                   "SANDBOX_READ_SHARE": "0.25"})
    assert cfg.webhook_url == "http://omni:8882/webhook/evolution" and cfg.read_share == 0.25
    for name, value in [("SANDBOX_RECEIPT_SHARE", "1.5"), ("SANDBOX_READ_SHARE", "x"),
                        ("SANDBOX_RECEIPT_DELAY_MS", "-1"), ("SANDBOX_READ_DELAY_MS", "nan"),
                        ("SANDBOX_WEBHOOK_URL", "omni:8882/webhook")]:
        with pytest.raises(sandbox.ConfigError, match=name):
            sandbox.config_from_env({name: value})


# ---------------------------------------------------------------- sandbox in-process


def test_directive_parsing_and_latency_model():
    parsed = sandbox.parse_directives("a #delay=250 #evo_status=500 #garbage")
    assert parsed.delay_ms == 250 and parsed.evo_status == 500
    assert parsed.status is None and parsed.garbage and not parsed.hang

    state = sandbox.SandboxState(sandbox.SandboxConfig(slow_rate=1.0, fail_rate=1.0, seed=7))
    plain = sandbox.Directives()
    assert 10.5 <= sandbox.agent_delay_s(state, plain) <= 14.0
    assert sandbox.agent_status(state, plain) == 500
    # Directives override the model.
    steered = sandbox.parse_directives("#delay=5 #status=200")
    assert sandbox.agent_delay_s(state, steered) == 0.005
    assert sandbox.agent_status(state, steered) == 200

    median = sandbox.SandboxState(sandbox.SandboxConfig(latency_median_ms=100, seed=1))
    delays = sorted(sandbox.agent_delay_s(median, plain) for _ in range(2001))
    assert 0.08 < delays[1000] < 0.12


def test_config_from_env():
    cfg = sandbox.config_from_env({"SANDBOX_LATENCY_MEDIAN_MS": "800", "SANDBOX_SEED": "3",
                                   "SANDBOX_PORT": "9999"})
    assert cfg.latency_median_ms == 800 and cfg.seed == 3 and cfg.port == 9999
    assert cfg.host == "127.0.0.1" and cfg.slow_rate == 0 and cfg.fail_rate == 0
    with pytest.raises(sandbox.ConfigError, match="SANDBOX_SIGMA|SANDBOX_LATENCY_SIGMA"):
        sandbox.config_from_env({"SANDBOX_LATENCY_SIGMA": "x"})


def test_storage_bounds_in_process():
    assert sandbox.SandboxConfig().sent_limit == 10_000
    assert sandbox.SandboxConfig().alerts_limit == 1_000

    async def scenario() -> tuple[list, list]:
        app = sandbox.create_app(sandbox.SandboxConfig(sent_limit=5, alerts_limit=3))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        base = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as client:
                for i in range(12):
                    await client.post(f"{base}/message/sendText/x",
                                      json={"number": "55", "text": f"t{i}"})
                    await client.post(f"{base}/alerts", json={"n": i})
                async with client.get(f"{base}/sent") as resp:
                    sent = await resp.json()
                async with client.get(f"{base}/alerts") as resp:
                    alerts = await resp.json()
        finally:
            await runner.cleanup()
        return sent, alerts

    sent, alerts = asyncio.run(scenario())
    assert [s["text"] for s in sent] == ["t11", "t10", "t9", "t8", "t7"]
    assert [a["body"]["n"] for a in alerts] == [11, 10, 9]


def test_runtime_faults_win_over_directives_and_switch_off():
    async def scenario() -> dict:
        app = sandbox.create_app(sandbox.SandboxConfig())
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        out: dict = {}
        run = {"message_content": "hi #status=200", "user_id": "u", "session_name": "s"}
        send = {"number": "5511999990000", "text": "Echo: hi"}
        try:
            async with aiohttp.ClientSession() as client:
                async def agent(timeout: float = 5.0) -> int | str:
                    try:
                        async with client.post(f"{base}/api/v1/agent/default/run", json=run,
                                               timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                            return r.status
                    except asyncio.TimeoutError:
                        return "timeout"

                async def evo() -> int:
                    async with client.post(f"{base}/message/sendText/x", json=send) as r:
                        return r.status

                async def put(body: dict) -> tuple[int, dict]:
                    async with client.put(f"{base}/faults", json=body) as r:
                        return r.status, await r.json()

                out["before"] = (await agent(), await evo())
                out["agent_500"] = await put({"agent_status": 500})
                out["during_500"] = (await agent(), await evo())
                await put({"agent_status": None, "agent_hang": True, "evo_status": 503})
                out["during_hang"] = (await agent(timeout=0.5), await evo())
                async with client.get(f"{base}/faults") as r:
                    out["listed"] = await r.json()
                out["bad"] = [(await put(b))[0] for b in
                              ({"agent_status": 42}, {"agent_hang": "yes"}, {"evo": 503},
                               {"evo_status": True})]
                async with client.delete(f"{base}/faults") as r:
                    out["cleared"] = await r.json()
                out["after"] = (await agent(), await evo())
        finally:
            await runner.cleanup()
        return out

    out = asyncio.run(scenario())
    assert out["before"] == (200, 201)
    assert out["agent_500"] == (200, {"agent_status": 500, "agent_hang": False, "evo_status": None})
    assert out["during_500"] == (500, 201)
    assert out["during_hang"] == ("timeout", 503)
    assert out["listed"] == {"agent_status": None, "agent_hang": True, "evo_status": 503}
    assert out["bad"] == [400, 400, 400, 400]
    assert out["cleared"] == {"agent_status": None, "agent_hang": False, "evo_status": None}
    assert out["after"] == (200, 201)


def test_sent_and_calls_limits_from_env():
    cfg = sandbox.config_from_env({"SANDBOX_SENT_LIMIT": "50000", "SANDBOX_CALLS_LIMIT": "7"})
    assert cfg.sent_limit == 50_000 and cfg.calls_limit == 7
    for name in ("SANDBOX_SENT_LIMIT", "SANDBOX_CALLS_LIMIT"):
        with pytest.raises(sandbox.ConfigError, match=name):
            sandbox.config_from_env({name: "0"})


# ---------------------------------------------------------------- loadgen


def test_build_webhook_shape():
    env = loadgen.build_webhook("demo", "5515551234567", "What can you do?")
    assert env["event"] == "messages.upsert" and env["instance"] == "demo"
    data = env["data"]
    assert data["key"]["remoteJid"] == "5515551234567@s.whatsapp.net"
    assert data["key"]["fromMe"] is False
    assert re.fullmatch(r"3EB0[0-9A-F]{16}", data["key"]["id"])
    assert data["message"] == {"conversation": "What can you do?"}
    assert data["messageType"] == "conversation"
    assert isinstance(data["messageTimestamp"], int) and data["pushName"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", env["date_time"])
    assert "server_url" in env and "apikey" in env

    ext = loadgen.build_webhook("demo", "551", "hi", message_id="3EB0ABC", extended=True)
    assert ext["data"]["message"] == {"extendedTextMessage": {"text": "hi"}}
    assert ext["data"]["messageType"] == "extendedTextMessage"
    assert ext["data"]["key"]["id"] == "3EB0ABC"
    assert json.loads(json.dumps(ext)) == ext
    with pytest.raises(ValueError):
        loadgen.build_webhook("demo", "not-digits", "hi")


def test_pick_text_shares():
    rng = random.Random(5)
    texts = [loadgen.pick_text(rng, 0.5, 0.5) for _ in range(400)]
    slow = sum("#delay=" in t for t in texts)
    failing = sum(("#status=" in t) or ("#evo_status=" in t) for t in texts)
    assert 140 < slow < 260 and 140 < failing < 260
    assert all(10500 <= int(m) <= 13000 for t in texts for m in re.findall(r"#delay=(\d+)", t))


class StubGateway(LocalHTTPServer):
    """A tiny stand-in for the gateway that records what it received."""

    daemon_threads = True

    def __init__(self, port: int) -> None:
        super().__init__(("127.0.0.1", port), StubHandler)
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.instance_exists = False

    def record(self, method: str, path: str, headers: dict, body: object) -> None:
        with self.lock:
            self.requests.append({"method": method, "path": path, "headers": headers,
                                  "body": body})

    def matching(self, method: str, path: str) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["method"] == method and r["path"] == path]


class StubHandler(JsonHandler):

    def _body(self) -> object:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw) if raw else None

    def do_GET(self) -> None:
        server: StubGateway = self.server
        server.record("GET", self.path, dict(self.headers), None)
        if self.path == "/api/v1/instances/demo" and server.instance_exists:
            self._answer(200, {"name": "demo"})
        else:
            self._answer(404, {"error": "not found"})

    def do_POST(self) -> None:
        server: StubGateway = self.server
        body = self._body()
        server.record("POST", self.path, dict(self.headers), body)
        if self.path == "/api/v1/instances":
            created = not server.instance_exists
            server.instance_exists = True
            self._answer(201 if created else 409, {"name": "demo"})
        elif self.path == "/webhook/evolution/demo":
            self._answer(202, {"status": "accepted", "trace_id": "t", "instance": "demo"})
        else:
            self._answer(404, {"error": "not found"})


def loadgen_cmd(port: int, *extra: str) -> list[str]:
    """The loadgen command line against a stub gateway on port."""
    return [sys.executable, "-m", "demo.loadgen", "--url", f"http://127.0.0.1:{port}",
            "--api-key", API_KEY, "--sandbox-url", "http://127.0.0.1:8890", "--seed", "1",
            *extra]


def check_created_once(gateway: StubGateway) -> None:
    """Assert the demo instance was created exactly once, with the API key."""
    creates = gateway.matching("POST", "/api/v1/instances")
    assert len(creates) == 1
    headers = {k.lower(): v for k, v in creates[0]["headers"].items()}
    assert headers["x-api-key"] == API_KEY
    body = creates[0]["body"]
    assert body["name"] == "demo" and body["agent_api_url"] == "http://127.0.0.1:8890"
    assert body["evolution_url"] == "http://127.0.0.1:8890" and body["agent_timeout_s"] == 30


def test_loadgen_steady_rate_against_stub():
    port = free_port()
    with StubGateway(port) as gateway:
        proc = subprocess.run(loadgen_cmd(port, "--rate", "20", "--duration", "2"),
                              cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                              timeout=20)
    assert proc.returncode == 0, proc.stderr
    check_created_once(gateway)
    hooks = gateway.matching("POST", "/webhook/evolution/demo")
    assert 30 <= len(hooks) <= 45
    ids = {h["body"]["data"]["key"]["id"] for h in hooks}
    assert len(ids) == len(hooks)
    assert all(h["body"]["event"] == "messages.upsert" for h in hooks)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["sent"] == len(hooks)
    assert summary["by_status"] == {"202": len(hooks)} and summary["errors"] == 0
    assert set(summary["ack_ms"]) == {"p50", "p99", "max"}


def test_loadgen_waits_for_gateway_and_stops_on_sigterm():
    port = free_port()
    proc = subprocess.Popen(loadgen_cmd(port, "--rate", "10", "--duration", "0",
                                        "--webhook-secret", "s3cret"),
                            cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # the gateway is "still starting": connection refused
        assert proc.poll() is None
        with StubGateway(port) as gateway:
            deadline = time.monotonic() + 5
            while len(gateway.matching("POST", "/webhook/evolution/demo")) < 5:
                assert time.monotonic() < deadline, "no webhooks after the gateway came up"
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=10)
        check_created_once(gateway)
        hooks = gateway.matching("POST", "/webhook/evolution/demo")
        assert all(h["headers"].get("x-webhook-secret") == "s3cret" for h in hooks)
    finally:
        stop_process(proc)
    assert proc.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["sent"] >= 5 and summary["by_status"].get("202", 0) >= 5
