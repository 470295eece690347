"""Agent replies at the edges of HTTP and SSE, through the service (gunicorn, real
PostgreSQL) against a hand-written agent: over-long SSE lines, multi-line `data:` events,
redirects and oversized plain replies."""
from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.support import free_port, metric, parse_metrics

BIG = 2 << 20  # over MAX_REPLY_BYTES (1 MiB)
SLOW_SENDS: list[str] = []


class CraftedAgent(BaseHTTPRequestHandler):
    """Answers the agent endpoint with what the message's first word names."""

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path.startswith("/message/sendText/"):
            # An Evolution API that takes the message and answers too late.
            SLOW_SENDS.append(body["text"])
            time.sleep(3)
            try:
                self.send_response(201)
                self.end_headers()
            except OSError:
                pass
            return
        mode = body["message_content"].split()[0]
        if mode == "redirect":
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1:9/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if mode in ("huge", "huge-unsized"):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            if mode == "huge":
                self.send_header("Content-Length", str(BIG))
            self.end_headers()
            # Then the body stalls: only a client that stops at its bound is done before
            # its timeout.
            try:
                if mode == "huge-unsized":
                    self.wfile.write(b'{"message": "' + b"x" * (BIG * 3 // 4))
                    self.wfile.flush()
                time.sleep(8)
            except OSError:
                pass
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        if mode == "longline":
            stream = b'data: {"content": "' + b"y" * BIG + b'"}\n\n'
        else:  # multiline: events spread over several data lines, with comments and fields
            stream = (b": keep-alive\n"
                      b"event: message\nid: 1\n"
                      b'data: {"content":\n'
                      b'data:  "Hello"}\n\n'
                      b"retry: 1000\n"
                      b'data: {"content": " multi\\nline",\r\n'
                      b'data: "extra": 1}\r\n\r\n'
                      b"data: [DONE]\n\n")
        try:
            self.wfile.write(stream)
        except OSError:
            pass


@pytest.fixture(scope="module")
def crafted():
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), CraftedAgent)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _run(service, crafted, instance: str, text: str, *, stream: bool) -> dict:
    service.ensure_instance(instance, service.sandbox.url, agent_api_url=crafted, agent_stream=stream)
    r = service.send(instance, text)
    assert r.status_code == 202, r.text
    return service.wait_final(r.json()["trace_id"], timeout=20)


def _errors(service, reason: str) -> float:
    return metric(parse_metrics(service.metrics_text()), "omni_upstream_errors_total",
                  upstream="agent", reason=reason)


def test_sse_line_over_the_limit_is_a_failed_bad_response(service, crafted):
    """One SSE line of 2 MiB: a `failed` agent_called step with reason bad_response, not an
    internal `error` (aiohttp raised LineTooLong out of the pipeline)."""
    before = _errors(service, "bad_response")
    trace = _run(service, crafted, "longline", f"longline {uuid.uuid4().hex}", stream=True)
    assert trace["status"] == "failed", trace
    assert trace["failed_step"] == "agent_called"
    assert trace["error_message"] == "agent stream sent a line over 1 MiB"
    assert _errors(service, "bad_response") == before + 1


def test_multi_line_data_events_are_joined(service, crafted):
    """Consecutive `data:` lines of one event are joined with a newline before parsing;
    comments, event/id/retry fields and CRLF line ends are handled as the SSE format says."""
    token = uuid.uuid4().hex
    trace = _run(service, crafted, "multiline", f"multiline {token}", stream=True)
    assert trace["status"] == "completed", trace
    assert trace["response_content"] == "Hello multi\nline"
    assert any(s["text"] == "Hello multi\nline" for s in service.sandbox.sent())


def test_agent_redirect_is_http_3xx_and_not_followed(service, crafted):
    """A 302 from the agent is its own reason, http_3xx (seeded at 0), and is not followed."""
    seeded = parse_metrics(service.metrics_text())
    for upstream in ("agent", "evolution"):
        assert ("omni_upstream_errors_total",
                frozenset({("upstream", upstream), ("reason", "http_3xx")})) in seeded, upstream
    before = _errors(service, "http_3xx")
    trace = _run(service, crafted, "redirect", f"redirect {uuid.uuid4().hex}", stream=False)
    assert trace["status"] == "failed" and trace["error_message"] == "agent returned 302", trace
    assert _errors(service, "http_3xx") == before + 1


@pytest.mark.parametrize("mode", ["huge", "huge-unsized"])
def test_oversized_plain_reply_is_refused(service, crafted, mode):
    """A 2 MiB JSON reply whose body then stalls: refused on its Content-Length at once, or
    as soon as the bounded read passes 1 MiB when it has none (not after reading it whole or
    waiting for the agent timeout): bad_response, `agent reply too large`."""
    trace = _run(service, crafted, mode, f"{mode} {uuid.uuid4().hex}", stream=False)
    assert trace["status"] == "failed", trace
    assert trace["error_message"] == "agent reply too large"
    assert trace["duration_ms"] < 3000, trace["duration_ms"]  # not the agent timeout (5 s)


# --------------------------------------------------------------------------- Evolution retries


def _sends(service, text: str) -> list[int]:
    """Statuses the sandbox's Evolution answered for sends of text, oldest first."""
    return [s["status"] for s in reversed(service.sandbox.sent()) if s["text"] == text]


def _evolution_step(trace: dict) -> dict:
    return next(s for s in trace["steps"] if s["step"] == "evolution_send")


def test_evolution_503_blips_are_retried_into_one_reply(service):
    """Evolution answers 503 twice, then takes the message: one completed trace, three
    attempts recorded on the evolution_send step, exactly one reply delivered."""
    text = f"#evo_fail_first=2 blip {uuid.uuid4().hex}"
    r = service.send("bot", text)
    assert r.status_code == 202
    trace = service.wait_final(r.json()["trace_id"])
    assert trace["status"] == "completed", trace
    assert _evolution_step(trace)["attempts"] == 3
    assert _sends(service, f"Echo: {text}") == [503, 503, 201]


def test_evolution_retries_are_bounded_and_4xx_is_not_retried(service):
    """Still 503 after three attempts: `failed` with attempts 3; a 400 is not retried."""
    text = f"#evo_fail_first=9 down {uuid.uuid4().hex}"
    trace = service.wait_final(service.send("bot", text).json()["trace_id"])
    assert trace["status"] == "failed" and trace["error_message"] == "evolution returned 503", trace
    assert _evolution_step(trace)["attempts"] == 3
    assert _sends(service, f"Echo: {text}") == [503, 503, 503]
    text = f"#evo_status=400 refused {uuid.uuid4().hex}"
    trace = service.wait_final(service.send("bot", text).json()["trace_id"])
    assert trace["status"] == "failed" and _evolution_step(trace)["attempts"] == 1
    assert _sends(service, f"Echo: {text}") == [400]


def test_evolution_refused_connection_is_retried(service):
    """Nothing listens on the Evolution port: three attempts, then `failed` connection."""
    service.ensure_instance("evo-refused", service.sandbox.url, evolution_url=f"http://127.0.0.1:{free_port()}")
    trace = service.wait_final(service.send("evo-refused", "anyone there").json()["trace_id"])
    assert trace["status"] == "failed" and trace["error_message"].startswith("evolution unreachable")
    assert _evolution_step(trace)["attempts"] == 3


def test_evolution_timeout_is_never_retried(make_service, crafted):
    """An Evolution that took the message but answers after the send's timeout: one attempt
    only (a retry could deliver the reply twice), `failed` with reason timeout."""
    svc = make_service({"AUTOMAGIK_OMNI_EVOLUTION_TIMEOUT_S": "1.5"})
    svc.ensure_instance("evo-slow", svc.sandbox.url, evolution_url=crafted)
    token = uuid.uuid4().hex
    trace = svc.wait_final(svc.send("evo-slow", f"slow evolution {token}").json()["trace_id"])
    assert trace["status"] == "failed" and trace["error_message"] == "evolution timed out after 1.5 s"
    assert _evolution_step(trace)["attempts"] == 1
    time.sleep(3.5)  # a retry, if any, would have reached the slow Evolution by now
    assert SLOW_SENDS.count(f"Echo: slow evolution {token}") == 1
