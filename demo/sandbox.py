"""Demo sandbox: one aiohttp server that plays both upstreams of the gateway.

It answers the agent endpoint (``POST /api/v1/agent/{agent_name}/run``) and the
Evolution API ``sendText`` endpoint, records what it received, and sinks Grafana
alert notifications.  Message text can steer it with directives:

    #delay=<ms>        the agent answers after that long
    #status=<code>     the agent answers with that HTTP status
    #evo_status=<code> the Evolution send answers with that status
    #evo_fail_first=<n> the first n sends of this exact text answer 503, later ones succeed
    #garbage           the agent answers 200 with a body that is not JSON
    #hang              the agent never answers; the client has to give up
    #endless           (stream mode) chunks every 100 ms until the client leaves
    #usage=<form>      how the reply reports its tokens: request (request_tokens /
                       response_tokens, the default), prompt (prompt_ / completion_tokens),
                       input (input_ / output_tokens) or none (no usage at all)

Both modes report usage (in stream mode as an event before [DONE]): a deterministic count
from the message and reply text, so dashboards show tokens and cost in the demo.

``sendText`` takes ``number`` as digits, ``<digits>@s.whatsapp.net`` or ``<lid>@lid`` and
answers 201 with the sent message like Evolution (``key.id`` "3EB0" + 16 hex digits).
Like Evolution, it then reports what WhatsApp says about the reply: ``messages.update``
webhooks (``DELIVERY_ACK``, then ``READ``) posted to ``{SANDBOX_WEBHOOK_URL}/{instance}``
by background tasks, retried on 5xx and connection errors, never on 4xx.
``GET /receipts`` lists the receipts sent with the gateway's answers (newest first),
``DELETE /receipts`` forgets them.

Outages on a schedule (the chaos soak, bench/soak.py) are switched at run time rather than
written into each message, so they also hit messages already in flight:

    PUT /faults {"agent_status": 500}   every agent call answers 500 (any 200-599)
    PUT /faults {"agent_hang": true}    every agent call hangs until the client gives up
    PUT /faults {"evo_status": 503}     every sendText answers that status
    GET /faults, DELETE /faults         what is on; everything off

A PUT changes only the keys it names (null turns one off); a fault that is on wins over
the message's directives and the latency model.

Environment (all optional):

    SANDBOX_HOST, SANDBOX_PORT         bind address (127.0.0.1:8890)
    SANDBOX_LATENCY_MEDIAN_MS          agent latency median, lognormal (0: at once)
    SANDBOX_LATENCY_SIGMA              its spread (0.35)
    SANDBOX_SLOW_RATE                  share of 10.5-14 s agent answers (0)
    SANDBOX_FAIL_RATE                  share of agent 500s (0)
    SANDBOX_EVO_LATENCY_MS             sendText latency median (0)
    SANDBOX_SEED                       seed of the latency and receipt model
    SANDBOX_LOG_LEVEL                  DEBUG, INFO, WARNING, ERROR (INFO)
    SANDBOX_WEBHOOK_URL                gateway webhook base for receipts, e.g.
                                       http://127.0.0.1:8882/webhook/evolution
                                       (unset or empty: no receipts)
    SANDBOX_WEBHOOK_TOKEN              sent as header x-webhook-secret with receipts
    SANDBOX_RECEIPT_DELAY_MS           send to DELIVERY_ACK (300)
    SANDBOX_READ_DELAY_MS              DELIVERY_ACK to READ (1500)
    SANDBOX_RECEIPT_SHARE              share of sends delivered (1.0)
    SANDBOX_READ_SHARE                 share of the delivered ones read (0.8)
    SANDBOX_SENT_LIMIT                 sends kept for GET /sent (10000)
    SANDBOX_CALLS_LIMIT                agent calls kept for GET /calls (1000)

Run with ``python -m demo.sandbox [--host H] [--port P]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import re
import secrets
import sys
import uuid
from collections import Counter, deque
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Mapping

import aiohttp
from aiohttp import web

log = logging.getLogger("demo.sandbox")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8890
SLOW_RANGE_MS = (10_500.0, 14_000.0)
STREAM_CHUNK_GAP_S = 0.02
ENDLESS_CHUNK_GAP_S = 0.1
# Upper bound on how long a #hang request is held, so a forgotten client
# cannot pin a task for the life of the process.
HANG_LIMIT_S = 3600.0

_DELAY_RE = re.compile(r"#delay=(\d{1,9})\b")
# The look-behind keeps "#status=" from matching inside "#evo_status=".
_STATUS_RE = re.compile(r"(?<![A-Za-z0-9_])#status=(\d{3})\b")
_EVO_STATUS_RE = re.compile(r"#evo_status=(\d{3})\b")
_EVO_FAIL_FIRST_RE = re.compile(r"#evo_fail_first=(\d{1,3})\b")
_USAGE_RE = re.compile(r"#usage=(request|prompt|input|none)\b")
USAGE_FORMS = {"request": ("request_tokens", "response_tokens"),
               "prompt": ("prompt_tokens", "completion_tokens"),
               "input": ("input_tokens", "output_tokens")}
_FLAG_RES = {name: re.compile(rf"#{name}\b") for name in ("garbage", "hang", "endless")}
# What Evolution's sendText accepts as `number`: digits, a phone JID or a LID JID.
_NUMBER_RE = re.compile(r"([0-9]{1,32})(@s\.whatsapp\.net|@lid)?")
_CUID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
# Evolution fills server_url from its own SERVER_URL; the compose demo's name for the peer.
SERVER_URL = "http://sandbox:8890"
# Evolution retries a webhook a bounded number of times; a few attempts are enough here
# and keep a gateway that is down from piling up tasks.
RECEIPT_ATTEMPTS = 3
RECEIPT_BACKOFF_S = 0.5
RECEIPT_TIMEOUT_S = 10.0
# Receipts waiting or in flight beyond this are dropped (and logged): memory stays bounded
# when the gateway is slow for a long time.
RECEIPT_BACKLOG = 10_000


class ConfigError(ValueError):
    """A bad configuration value; the message names the variable."""


@dataclass(frozen=True)
class SandboxConfig:
    """Everything the sandbox can be told; defaults answer at once, never fail."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    latency_median_ms: float = 0.0
    latency_sigma: float = 0.35
    slow_rate: float = 0.0
    fail_rate: float = 0.0
    evo_latency_ms: float = 0.0
    seed: int | None = None
    log_level: str = "INFO"
    sent_limit: int = 10_000
    alerts_limit: int = 1_000
    calls_limit: int = 1_000
    webhook_url: str = ""
    webhook_token: str = ""
    receipt_delay_ms: float = 300.0
    read_delay_ms: float = 1500.0
    receipt_share: float = 1.0
    read_share: float = 0.8
    receipts_limit: int = 1_000


# ---------------------------------------------------------------- configuration


def _env_float(env: Mapping[str, str], name: str, default: float,
               low: float, high: float = math.inf) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not (low <= value <= high) or math.isnan(value):
        bound = f"between {low:g} and {high:g}" if high != math.inf else f">= {low:g}"
        raise ConfigError(f"{name}={raw!r} must be {bound}")
    return value


def _env_int(env: Mapping[str, str], name: str, default: int | None,
             low: int, high: int) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={raw!r} must be between {low} and {high}")
    return value


def config_from_env(env: Mapping[str, str] | None = None) -> SandboxConfig:
    """Build a SandboxConfig from SANDBOX_* variables; raise ConfigError on a bad value."""
    env = os.environ if env is None else env
    level = env.get("SANDBOX_LOG_LEVEL", "").strip().upper() or "INFO"
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"SANDBOX_LOG_LEVEL={level!r} must be DEBUG, INFO, WARNING or ERROR")
    return SandboxConfig(
        host=env.get("SANDBOX_HOST", "").strip() or DEFAULT_HOST,
        port=_env_int(env, "SANDBOX_PORT", DEFAULT_PORT, 1, 65535),
        latency_median_ms=_env_float(env, "SANDBOX_LATENCY_MEDIAN_MS", 0.0, 0.0),
        latency_sigma=_env_float(env, "SANDBOX_LATENCY_SIGMA", 0.35, 0.0, 5.0),
        slow_rate=_env_float(env, "SANDBOX_SLOW_RATE", 0.0, 0.0, 1.0),
        fail_rate=_env_float(env, "SANDBOX_FAIL_RATE", 0.0, 0.0, 1.0),
        evo_latency_ms=_env_float(env, "SANDBOX_EVO_LATENCY_MS", 0.0, 0.0),
        seed=_env_int(env, "SANDBOX_SEED", None, -(2**63), 2**63 - 1),
        log_level=level,
        webhook_url=_env_url(env, "SANDBOX_WEBHOOK_URL"),
        webhook_token=env.get("SANDBOX_WEBHOOK_TOKEN", "").strip(),
        receipt_delay_ms=_env_float(env, "SANDBOX_RECEIPT_DELAY_MS", 300.0, 0.0, 3_600_000.0),
        read_delay_ms=_env_float(env, "SANDBOX_READ_DELAY_MS", 1500.0, 0.0, 3_600_000.0),
        receipt_share=_env_float(env, "SANDBOX_RECEIPT_SHARE", 1.0, 0.0, 1.0),
        read_share=_env_float(env, "SANDBOX_READ_SHARE", 0.8, 0.0, 1.0),
        sent_limit=_env_int(env, "SANDBOX_SENT_LIMIT", 10_000, 1, 10_000_000),
        calls_limit=_env_int(env, "SANDBOX_CALLS_LIMIT", 1_000, 1, 10_000_000),
    )


def _env_url(env: Mapping[str, str], name: str) -> str:
    raw = env.get(name, "").strip()
    if raw and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", raw):
        raise ConfigError(f"{name}={raw!r} must be an http:// or https:// URL")
    return raw.rstrip("/")


# ---------------------------------------------------------------- state


class SandboxState:
    """What the sandbox has received; bounded so it can run for days."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.sent: deque[dict[str, Any]] = deque(maxlen=config.sent_limit)
        self.alerts: deque[dict[str, Any]] = deque(maxlen=config.alerts_limit)
        self.recent_calls: deque[dict[str, Any]] = deque(maxlen=config.calls_limit)
        self.calls_total = 0
        self.calls_by_status: Counter[str] = Counter()
        # Sends seen per (instance, number, text) carrying #evo_fail_first, oldest first.
        self.evo_sends: dict[tuple, int] = {}
        self.receipts: deque[dict[str, Any]] = deque(maxlen=config.receipts_limit)
        # Strong references: the loop keeps only weak ones to running tasks.
        self.receipt_tasks: set[asyncio.Task[None]] = set()
        self.receipts_dropped = 0
        self.client: aiohttp.ClientSession | None = None
        self.faults: dict[str, Any] = dict(NO_FAULTS)

    def count_send(self, key: tuple) -> int:
        """How many sends of key arrived before this one (bounded like the other records)."""
        seen = self.evo_sends.pop(key, 0)
        self.evo_sends[key] = seen + 1
        if len(self.evo_sends) > self.config.sent_limit:
            del self.evo_sends[next(iter(self.evo_sends))]
        return seen

    def reset_calls(self) -> None:
        """Forget the agent call counters."""
        self.recent_calls.clear()
        self.calls_total = 0
        self.calls_by_status.clear()


STATE = web.AppKey("sandbox_state", SandboxState)
NO_FAULTS: dict[str, Any] = {"agent_status": None, "agent_hang": False, "evo_status": None}


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------- directives & latency


@dataclass(frozen=True)
class Directives:
    """Directives found in a message text."""

    delay_ms: int | None = None
    status: int | None = None
    evo_status: int | None = None
    evo_fail_first: int = 0
    garbage: bool = False
    hang: bool = False
    endless: bool = False
    usage: str = "request"


def _status_code(match: re.Match[str] | None) -> int | None:
    if match is None:
        return None
    code = int(match.group(1))
    return code if 200 <= code <= 599 else None


def parse_directives(text: str) -> Directives:
    """Extract the #directives from a message text (unknown ones are ignored)."""
    if "#" not in text:
        return Directives()
    delay = _DELAY_RE.search(text)
    fail_first = _EVO_FAIL_FIRST_RE.search(text)
    return Directives(
        delay_ms=int(delay.group(1)) if delay else None,
        status=_status_code(_STATUS_RE.search(text)),
        evo_status=_status_code(_EVO_STATUS_RE.search(text)),
        evo_fail_first=int(fail_first.group(1)) if fail_first else 0,
        garbage=bool(_FLAG_RES["garbage"].search(text)),
        hang=bool(_FLAG_RES["hang"].search(text)),
        endless=bool(_FLAG_RES["endless"].search(text)),
        usage=usage.group(1) if (usage := _USAGE_RE.search(text)) else "request",
    )


def _lognormal_s(rng: random.Random, median_ms: float, sigma: float) -> float:
    if median_ms <= 0:
        return 0.0
    if sigma <= 0:
        return median_ms / 1000.0
    return rng.lognormvariate(math.log(median_ms), sigma) / 1000.0


def agent_delay_s(state: SandboxState, directives: Directives) -> float:
    """Seconds the agent waits before answering: directive first, then the model."""
    if directives.delay_ms is not None:
        # Capped like #hang so an absurd delay cannot pin a task for days.
        return min(directives.delay_ms / 1000.0, HANG_LIMIT_S)
    cfg = state.config
    if cfg.slow_rate > 0 and state.rng.random() < cfg.slow_rate:
        return state.rng.uniform(*SLOW_RANGE_MS) / 1000.0
    return _lognormal_s(state.rng, cfg.latency_median_ms, cfg.latency_sigma)


def agent_status(state: SandboxState, directives: Directives) -> int:
    """HTTP status the agent answers with: directive first, then the failure model."""
    if directives.status is not None:
        return directives.status
    if state.config.fail_rate > 0 and state.rng.random() < state.config.fail_rate:
        return 500
    return 200


def split_chunks(text: str, rng: random.Random) -> list[str]:
    """Split text into 3-5 non-empty consecutive pieces (fewer if text is tiny)."""
    count = min(rng.randint(3, 5), max(1, len(text)))
    cuts = sorted(rng.sample(range(1, len(text)), count - 1)) if count > 1 else []
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def _tokens(text: str) -> int:
    # Roughly what a tokenizer would say; only has to look plausible.
    return max(1, len(text) // 4)


# ---------------------------------------------------------------- helpers


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _status_response(status: int, body: dict[str, Any]) -> web.Response:
    # 1xx/204/304 must not carry a body; aiohttp refuses to send one.
    if status < 200 or status in (204, 304):
        return web.Response(status=status)
    return web.json_response(body, status=status)


async def _json_body(request: web.Request) -> dict[str, Any] | None:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


async def _wait_for_disconnect(request: web.Request, limit_s: float) -> None:
    # Handler cancellation is off by default in aiohttp, so poll the transport
    # rather than rely on CancelledError to notice that the client left.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while loop.time() < deadline:
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        await asyncio.sleep(0.1)


# ---------------------------------------------------------------- agent


def _record_call(state: SandboxState, agent: str, body: dict[str, Any],
                 request: web.Request, outcome: str) -> None:
    state.calls_total += 1
    state.calls_by_status[outcome] += 1
    state.recent_calls.appendleft({
        "agent": agent,
        "user_id": body.get("user_id"),
        "session_name": body.get("session_name"),
        "message_content": body.get("message_content"),
        "stream": bool(body.get("stream")),
        "api_key_present": bool(request.headers.get("x-api-key")),
        "outcome": outcome,
        "received_at": _now_iso(),
    })


def usage_of(message: str, reply: str, form: str) -> dict[str, int] | None:
    """The usage object in the given form (see #usage=), None for `none`."""
    keys = USAGE_FORMS.get(form)
    if keys is None:
        return None
    return {keys[0]: _tokens(message), keys[1]: _tokens(reply)}


def _session_id(body: dict[str, Any]) -> str:
    session = body.get("session_name")
    return session if isinstance(session, str) and session else str(uuid.uuid4())


def _reply_payload(message: str, body: dict[str, Any], reply: str, form: str = "request") -> dict[str, Any]:
    payload: dict[str, Any] = {"message": reply, "session_id": _session_id(body), "success": True}
    usage = usage_of(message, reply, form)
    if usage is not None:
        payload["usage"] = usage
    return payload


def _sse(payload: str) -> bytes:
    return f"data: {payload}\n\n".encode()


async def _start_sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers={
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
    })
    await response.prepare(request)
    return response


async def _stream_reply(request: web.Request, state: SandboxState, reply: str,
                        delay_s: float, usage: dict[str, int] | None = None,
                        session_id: str | None = None) -> web.StreamResponse:
    await asyncio.sleep(delay_s)
    response = await _start_sse(request)
    try:
        for index, chunk in enumerate(split_chunks(reply, state.rng)):
            if index:
                await asyncio.sleep(STREAM_CHUNK_GAP_S)
            await response.write(_sse(json.dumps({"content": chunk})))
        if usage is not None:
            await response.write(_sse(json.dumps({"usage": usage, "session_id": session_id})))
        await response.write(_sse("[DONE]"))
        await response.write_eof()
    except ConnectionError:
        pass  # the client gave up mid-stream; nothing to tell it
    return response


async def _stream_endless(request: web.Request, delay_s: float) -> web.StreamResponse:
    await asyncio.sleep(delay_s)
    response = await _start_sse(request)
    try:
        for index in range(int(HANG_LIMIT_S / ENDLESS_CHUNK_GAP_S)):
            await response.write(_sse(json.dumps({"content": f"chunk {index} "})))
            await asyncio.sleep(ENDLESS_CHUNK_GAP_S)
            if request.transport is None or request.transport.is_closing():
                break
    except ConnectionError:
        pass  # expected: this is how an endless stream ends
    return response


async def _garbage_reply(request: web.Request, stream: bool) -> web.StreamResponse:
    if not stream:
        return web.Response(status=200, text="<html><body>502 Bad Gateway</body></html>",
                            content_type="text/html")
    # A stream that breaks its own format and never says [DONE].
    response = await _start_sse(request)
    try:
        await response.write(b"data: {not json\n\n")
        await response.write_eof()
    except ConnectionError:
        pass
    return response


def _outcome(directives: Directives, status: int, stream: bool) -> str:
    if directives.hang or (directives.endless and not stream):
        return "hang"
    if directives.endless:
        return "endless"
    if directives.garbage:
        return "garbage"
    return str(status)


async def handle_agent_run(request: web.Request) -> web.StreamResponse:
    """Agent endpoint: echo the message, steered by directives and the latency model."""
    state = request.app[STATE]
    agent = request.match_info["agent_name"]
    body = await _json_body(request)
    if body is None:
        return _error(400, "body must be a JSON object")
    message = body.get("message_content")
    if not isinstance(message, str):
        return _error(400, "message_content must be a string")
    stream = body.get("stream") is True
    directives = parse_directives(message)
    faults = state.faults
    if faults["agent_hang"]:
        directives = replace(directives, hang=True)
    elif faults["agent_status"] is not None:
        directives = replace(directives, status=faults["agent_status"], garbage=False,
                             hang=False, endless=False)
    delay_s = agent_delay_s(state, directives)
    status = 200 if (directives.garbage or directives.hang) else agent_status(state, directives)
    outcome = _outcome(directives, status, stream)
    _record_call(state, agent, body, request, outcome)
    log.debug("agent %s stream=%s outcome=%s delay_ms=%.0f", agent, stream, outcome, delay_s * 1000)

    if outcome == "hang":
        await _wait_for_disconnect(request, HANG_LIMIT_S)
        return web.Response(status=504)  # only reached after HANG_LIMIT_S
    if outcome == "endless":
        return await _stream_endless(request, delay_s)
    if outcome == "garbage":
        await asyncio.sleep(delay_s)
        return await _garbage_reply(request, stream)
    if status >= 300:
        await asyncio.sleep(delay_s)
        return _status_response(status, {"error": f"sandbox agent answered {status} as asked"})
    reply = f"Echo: {message}"
    if stream:
        return await _stream_reply(request, state, reply, delay_s,
                                   usage_of(message, reply, directives.usage), _session_id(body))
    await asyncio.sleep(delay_s)
    return _status_response(status, _reply_payload(message, body, reply, directives.usage))


# ---------------------------------------------------------------- evolution


def parse_number(number: Any) -> str | None:
    """The remoteJid Evolution would send to for a sendText `number`, or None if it is junk."""
    if isinstance(number, bool) or not isinstance(number, (str, int)):
        return None
    match = _NUMBER_RE.fullmatch(str(number))
    if match is None:
        return None
    digits, server = match.groups()
    return f"{digits}{server or '@s.whatsapp.net'}"


def new_key_id() -> str:
    """A WhatsApp-style message id: '3EB0' + 16 upper-case hex digits."""
    # Not from the seeded generator: a restarted sandbox must not repeat ids the
    # gateway already stored.
    return "3EB0" + secrets.token_hex(8).upper()


def new_cuid() -> str:
    """A cuid-like id as Evolution's database gives its rows: 'cm' + 23 lowercase alnum."""
    return "cm" + "".join(secrets.choice(_CUID_ALPHABET) for _ in range(23))


def instance_uuid(instance: str) -> str:
    """A stable uuid per instance name, like Evolution's instanceId."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"sandbox-evolution/{instance}"))


def sent_message(instance: str, remote_jid: str, text: str, key_id: str) -> dict[str, Any]:
    """The body Evolution's sendText answers with for a text sent to remote_jid."""
    return {
        "key": {"remoteJid": remote_jid, "fromMe": True, "id": key_id},
        "pushName": "",
        "status": "PENDING",
        "message": {"conversation": text},
        "messageType": "conversation",
        "messageTimestamp": int(datetime.now(timezone.utc).timestamp()),
        "instanceId": instance_uuid(instance),
        "source": "unknown",
    }


def receipt_envelope(instance: str, key_id: str, remote_jid: str, status: str,
                     url: str) -> dict[str, Any]:
    """An Evolution 2.3 `messages.update` webhook for one of our sends."""
    return {
        "event": "messages.update",
        "instance": instance,
        "data": {"keyId": key_id, "remoteJid": remote_jid, "fromMe": True, "participant": None,
                 "status": status, "instanceId": instance_uuid(instance),
                 "messageId": new_cuid()},
        "destination": url,
        "date_time": _now_iso(),
        "sender": remote_jid,
        "server_url": SERVER_URL,
        "apikey": None,
    }


async def _post_receipt(state: SandboxState, instance: str, key_id: str, remote_jid: str,
                        status: str) -> None:
    cfg = state.config
    url = f"{cfg.webhook_url}/{instance}"
    body = receipt_envelope(instance, key_id, remote_jid, status, url)
    headers = {"x-webhook-secret": cfg.webhook_token} if cfg.webhook_token else {}
    answer: int | None = None
    error: str | None = None
    attempts = 0
    for attempts in range(1, RECEIPT_ATTEMPTS + 1):
        try:
            async with state.client.post(url, json=body, headers=headers) as resp:
                await resp.read()
                answer, error = resp.status, None
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            answer, error = None, f"{type(exc).__name__}: {exc}"[:200]
        if answer is not None and answer < 500:
            break
        if attempts < RECEIPT_ATTEMPTS:
            await asyncio.sleep(RECEIPT_BACKOFF_S * 2 ** (attempts - 1))
    state.receipts.appendleft({
        "instance": instance, "key_id": key_id, "remote_jid": remote_jid, "status": status,
        "url": url, "answer_status": answer, "error": error, "attempts": attempts,
        "sent_at": _now_iso(),
    })
    if answer is None or answer >= 300:
        log.warning("receipt %s %s to %s: %s", status, key_id, url, error or answer)


async def _receipts(state: SandboxState, instance: str, key_id: str, remote_jid: str,
                    read: bool) -> None:
    cfg = state.config
    await asyncio.sleep(cfg.receipt_delay_ms / 1000.0)
    await _post_receipt(state, instance, key_id, remote_jid, "DELIVERY_ACK")
    if read:
        await asyncio.sleep(cfg.read_delay_ms / 1000.0)
        await _post_receipt(state, instance, key_id, remote_jid, "READ")


def schedule_receipts(state: SandboxState, instance: str, key_id: str, remote_jid: str) -> bool:
    """Start the background receipts of one send, as the model says; True if any will come."""
    cfg = state.config
    if not cfg.webhook_url or state.client is None:
        return False
    if not state.rng.random() < cfg.receipt_share:
        return False
    read = state.rng.random() < cfg.read_share
    if len(state.receipt_tasks) >= RECEIPT_BACKLOG:
        state.receipts_dropped += 1
        log.warning("receipt backlog full (%d): receipts of %s dropped", RECEIPT_BACKLOG, key_id)
        return False
    task = asyncio.create_task(_receipts(state, instance, key_id, remote_jid, read))
    state.receipt_tasks.add(task)
    task.add_done_callback(state.receipt_tasks.discard)
    return True


async def handle_send_text(request: web.Request) -> web.Response:
    """Evolution sendText: record the send, answer 201 with the sent message unless told otherwise."""
    state = request.app[STATE]
    instance = request.match_info["instance"]
    body = await _json_body(request) or {}
    number, text = body.get("number"), body.get("text")
    remote_jid = parse_number(number) if isinstance(text, str) else None
    valid = remote_jid is not None
    directives = parse_directives(text) if isinstance(text, str) else Directives()
    status = (state.faults["evo_status"] or directives.evo_status or 201) if valid else 400
    if valid and directives.evo_fail_first and \
            state.count_send((instance, str(number), text)) < directives.evo_fail_first:
        status = 503
    key_id = new_key_id() if status < 300 else None
    state.sent.appendleft({
        "instance": instance,
        "number": None if number is None else str(number),
        "remote_jid": remote_jid,
        "text": text,
        "message_id": key_id,
        "apikey_present": bool(request.headers.get("apikey")),
        "received_at": _now_iso(),
        "status": status,
    })
    log.debug("sendText %s status=%d", instance, status)
    cfg = state.config
    await asyncio.sleep(_lognormal_s(state.rng, cfg.evo_latency_ms, cfg.latency_sigma))
    if not valid:
        return _error(400, "body must be {\"number\": \"<digits>|<digits>@s.whatsapp.net|"
                           "<lid>@lid\", \"text\": \"<text>\"}")
    if status >= 300:
        return _status_response(status, {"error": f"sandbox evolution answered {status} as asked"})
    schedule_receipts(state, instance, key_id, remote_jid)
    return _status_response(status, sent_message(instance, remote_jid, text, key_id))


async def handle_faults_get(request: web.Request) -> web.Response:
    """GET /faults: the outages switched on."""
    return web.json_response(request.app[STATE].faults)


async def handle_faults_put(request: web.Request) -> web.Response:
    """PUT /faults: switch outages on or off (only the keys given); 400 names a bad one."""
    body = await _json_body(request)
    if body is None:
        return _error(400, "body must be a JSON object")
    state = request.app[STATE]
    faults = dict(state.faults)
    for key, value in body.items():
        if key not in NO_FAULTS:
            return _error(400, f"unknown fault {key!r} (known: {', '.join(NO_FAULTS)})")
        if key == "agent_hang":
            if not isinstance(value, bool):
                return _error(400, "agent_hang must be true or false")
        elif value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                    or not 200 <= value <= 599):
            return _error(400, f"{key} must be an HTTP status 200-599 or null")
        faults[key] = value
    state.faults = faults
    log.info("faults now %s", faults)
    return web.json_response(faults)


async def handle_faults_clear(request: web.Request) -> web.Response:
    """DELETE /faults: every outage off."""
    request.app[STATE].faults = dict(NO_FAULTS)
    return web.json_response(NO_FAULTS)


async def handle_sent_list(request: web.Request) -> web.Response:
    """GET /sent: the sends received, newest first."""
    return web.json_response(list(request.app[STATE].sent))


async def handle_sent_clear(request: web.Request) -> web.Response:
    """DELETE /sent: forget every send."""
    request.app[STATE].sent.clear()
    return web.json_response({"status": "cleared"})


async def handle_receipts_list(request: web.Request) -> web.Response:
    """GET /receipts: the receipts sent to the gateway with its answers, newest first."""
    return web.json_response(list(request.app[STATE].receipts))


async def handle_receipts_clear(request: web.Request) -> web.Response:
    """DELETE /receipts: forget the receipts sent."""
    request.app[STATE].receipts.clear()
    return web.json_response({"status": "cleared"})


async def _receipt_client(app: web.Application) -> Any:
    state = app[STATE]
    if state.config.webhook_url:
        state.client = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=RECEIPT_TIMEOUT_S),
            connector=aiohttp.TCPConnector(limit=64))
    yield
    for task in list(state.receipt_tasks):
        task.cancel()
    await asyncio.gather(*state.receipt_tasks, return_exceptions=True)
    if state.client is not None:
        await state.client.close()
        state.client = None


# ---------------------------------------------------------------- alerts, calls, health


async def handle_alert_post(request: web.Request) -> web.Response:
    """POST /alerts: store a Grafana notification body."""
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        return _error(400, "body must be JSON")
    request.app[STATE].alerts.appendleft({"received_at": _now_iso(), "body": body})
    return web.json_response({"status": "stored"})


async def handle_alert_list(request: web.Request) -> web.Response:
    """GET /alerts: the stored notifications, newest first."""
    return web.json_response(list(request.app[STATE].alerts))


async def handle_alert_clear(request: web.Request) -> web.Response:
    """DELETE /alerts: forget every notification."""
    request.app[STATE].alerts.clear()
    return web.json_response({"status": "cleared"})


async def handle_calls(request: web.Request) -> web.Response:
    """GET /calls: how many agent calls arrived, by outcome, plus the latest ones."""
    state = request.app[STATE]
    return web.json_response({
        "total": state.calls_total,
        "by_status": dict(state.calls_by_status),
        "recent": list(state.recent_calls),
    })


async def handle_calls_clear(request: web.Request) -> web.Response:
    """DELETE /calls: reset the agent call counters."""
    request.app[STATE].reset_calls()
    return web.json_response({"status": "cleared"})


async def handle_health(request: web.Request) -> web.Response:
    """GET /health: always ok while the loop runs."""
    return web.json_response({"status": "ok"})


def create_app(config: SandboxConfig | None = None) -> web.Application:
    """Build the sandbox application (usable in-process by tests)."""
    app = web.Application(client_max_size=2 * 1024 * 1024)
    app[STATE] = SandboxState(config or SandboxConfig())
    app.cleanup_ctx.append(_receipt_client)
    app.router.add_post("/api/v1/agent/{agent_name}/run", handle_agent_run)
    app.router.add_post("/message/sendText/{instance}", handle_send_text)
    app.router.add_get("/sent", handle_sent_list)
    app.router.add_delete("/sent", handle_sent_clear)
    app.router.add_get("/receipts", handle_receipts_list)
    app.router.add_delete("/receipts", handle_receipts_clear)
    app.router.add_post("/alerts", handle_alert_post)
    app.router.add_get("/alerts", handle_alert_list)
    app.router.add_delete("/alerts", handle_alert_clear)
    app.router.add_get("/calls", handle_calls)
    app.router.add_delete("/calls", handle_calls_clear)
    app.router.add_get("/health", handle_health)
    app.router.add_get("/faults", handle_faults_get)
    app.router.add_put("/faults", handle_faults_put)
    app.router.add_delete("/faults", handle_faults_clear)
    return app


# ---------------------------------------------------------------- entry point


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m demo.sandbox",
                                     description="Agent + Evolution API simulator.")
    parser.add_argument("--host", help="bind address (overrides SANDBOX_HOST)")
    parser.add_argument("--port", type=int, help="bind port (overrides SANDBOX_PORT)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the sandbox until SIGINT/SIGTERM."""
    args = _parse_args(argv)
    try:
        config = config_from_env()
    except ConfigError as exc:
        print(f"demo.sandbox: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.port is not None and not 1 <= args.port <= 65535:
        print(f"demo.sandbox: --port {args.port} must be between 1 and 65535", file=sys.stderr)
        return 2
    config = replace(config, host=args.host or config.host,
                     port=config.port if args.port is None else args.port)
    logging.basicConfig(level=config.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    log.info("sandbox listening on http://%s:%d (median=%gms sigma=%g slow=%g fail=%g evo=%gms)",
             config.host, config.port, config.latency_median_ms, config.latency_sigma,
             config.slow_rate, config.fail_rate, config.evo_latency_ms)
    if config.webhook_url:
        log.info("receipts to %s/<instance> (delivered %g after %gms, read %g after %gms more)",
                 config.webhook_url, config.receipt_share, config.receipt_delay_ms,
                 config.read_share, config.read_delay_ms)
    try:
        # A short shutdown timeout: #hang and slow requests must not delay a stop.
        web.run_app(create_app(config), host=config.host, port=config.port,
                    access_log=None, print=None, shutdown_timeout=1.0)
    except OSError as exc:
        print(f"demo.sandbox: cannot listen on {config.host}:{config.port}: {exc}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
