"""The two upstream calls of SPEC 4.5: the instance's AI agent and the Evolution API send."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import aiohttp
from aiohttp.http_exceptions import LineTooLong

from app.instances import Instance

MAX_REPLY_BYTES = 1 << 20
# sendText answers with the sent message (a few hundred bytes); the id is all we read of it.
MAX_SEND_ANSWER_BYTES = 64 << 10
# Evolution blips (a restart, a proxy's 503) are retried: this many sends at most, the first
# pause EVOLUTION_BACKOFF_S and doubling, all within the send's timeout.
EVOLUTION_ATTEMPTS = 3
EVOLUTION_BACKOFF_S = 0.25
# A retry is only worth starting with at least this long left of the send's timeout.
EVOLUTION_MIN_ATTEMPT_S = 1.0


class UpstreamError(Exception):
    """An upstream said no or did not answer; `reason` is a metric label, str() the detail."""

    attempts = 1

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class AgentReply:
    """What the agent answered."""

    text: str
    first_chunk_s: float | None = None
    # Token usage as the agent reported it; None when it did not say (never guessed as 0).
    input_tokens: int | None = None
    output_tokens: int | None = None
    session_id: str | None = None


# The names agents use for (input, output) tokens in their `usage` object.
USAGE_KEYS = (("request_tokens", "response_tokens"), ("prompt_tokens", "completion_tokens"),
              ("input_tokens", "output_tokens"))
MAX_SESSION_ID = 256


def _token_count(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if value != value or not 0 <= value < 2**31 or int(value) != value:
        return None
    return int(value)


def parse_usage(data: object) -> tuple[int | None, int | None]:
    """(input, output) tokens from a reply or stream event's `usage`; None where not said.

    A malformed usage is ignored rather than failing the message: it is telemetry.
    """
    usage = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(usage, dict):
        return None, None
    for inp, out in USAGE_KEYS:
        if inp in usage or out in usage:
            return _token_count(usage.get(inp)), _token_count(usage.get(out))
    return None, None


def parse_session_id(data: object) -> str | None:
    """The agent's session id, if it gave a usable one."""
    value = data.get("session_id") if isinstance(data, dict) else None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    text = str(value)
    return text[:MAX_SESSION_ID] if text else None


def _http_reason(status: int) -> str:
    return "http_3xx" if status < 400 else "http_4xx" if status < 500 else "http_5xx"


async def call_agent(session: aiohttp.ClientSession, inst: Instance, text: str, user_id: str,
                     digits: str) -> AgentReply:
    """POST the message to the agent; plain JSON or SSE stream, within the instance timeout."""
    body = {"message_content": text, "user_id": user_id, "session_name": f"{inst.name}_{digits}",
            "message_type": "text", "session_origin": "whatsapp", "stream": inst.agent_stream}
    headers = {"x-api-key": inst.agent_api_key} if inst.agent_api_key else {}
    url = f"{inst.agent_api_url}/api/v1/agent/{inst.agent_name}/run"
    started = time.perf_counter()
    try:
        async with asyncio.timeout(inst.agent_timeout_s):
            # A redirect is not followed: it would carry the agent key (x-api-key) elsewhere.
            async with session.post(url, json=body, headers=headers, allow_redirects=False) as resp:
                if resp.status >= 300:
                    raise UpstreamError(_http_reason(resp.status), f"agent returned {resp.status}")
                if inst.agent_stream:
                    return await _read_stream(resp, started)
                return _parse_reply(await _read_reply(resp))
    except TimeoutError:
        raise UpstreamError("timeout", f"agent timed out after {inst.agent_timeout_s:g} s") from None
    except aiohttp.ClientError as exc:
        raise UpstreamError("connection", f"agent unreachable: {type(exc).__name__}") from None


async def _read_up_to(resp: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """(the body, or its first `limit` bytes; True when it was longer): the rest is never
    read, so a huge or endless body costs at most `limit` bytes of memory."""
    if resp.content_length is not None and resp.content_length > limit:
        return b"", True
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(16 << 10):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(chunks)[:limit], True
    return b"".join(chunks), False


async def _read_reply(resp: aiohttp.ClientResponse) -> bytes:
    """The agent's plain reply, refused as soon as it is known to exceed MAX_REPLY_BYTES."""
    raw, too_long = await _read_up_to(resp, MAX_REPLY_BYTES)
    if too_long:
        raise UpstreamError("bad_response", "agent reply too large")
    return raw


def _parse_reply(raw: bytes) -> AgentReply:
    try:
        data = json.loads(raw)
    except ValueError:
        raise UpstreamError("bad_response", "agent returned an invalid response (not JSON)") from None
    if not isinstance(data, dict) or not isinstance(data.get("message"), str):
        raise UpstreamError("bad_response", "agent returned an invalid response (no message)")
    if data.get("success") is False:
        raise UpstreamError("bad_response", "agent reported failure")
    inp, out = parse_usage(data)
    return AgentReply(text=data["message"], input_tokens=inp, output_tokens=out,
                      session_id=parse_session_id(data))


async def _read_stream(resp: aiohttp.ClientResponse, started: float) -> AgentReply:
    """Read a text/event-stream as the SSE format says: an event is its `data:` lines, joined
    with "\n", ended by a blank line; comments and other fields are skipped."""
    chunks: list[str] = []
    size = 0
    first: float | None = None
    data: list[bytes] | None = None
    final_usage: tuple[int | None, int | None] = (None, None)
    session_id: str | None = None
    while True:
        try:
            raw_line = await resp.content.readline(max_line_length=MAX_REPLY_BYTES)
        except (LineTooLong, ValueError):
            raise UpstreamError("bad_response", "agent stream sent a line over 1 MiB") from None
        if not raw_line or raw_line in (b"\n", b"\r\n"):
            if data is not None:
                payload = b"\n".join(data)
                data = None
                if payload.strip() == b"[DONE]":
                    return AgentReply(text="".join(chunks), first_chunk_s=first,
                                      input_tokens=final_usage[0], output_tokens=final_usage[1],
                                      session_id=session_id)
                try:
                    event = json.loads(payload)
                    content = event.get("content", "")
                except (ValueError, AttributeError):
                    raise UpstreamError("bad_response", "agent stream sent an invalid chunk") from None
                # Some agents send `"usage": null` on every chunk and the figures on the last one.
                usage = parse_usage(event)
                if usage != (None, None):
                    final_usage = usage
                session_id = parse_session_id(event) or session_id
                if not ("usage" in event and "content" not in event):  # usage-only: no chunk
                    if first is None:
                        first = time.perf_counter() - started
                    chunks.append(str(content))
            if not raw_line:
                break
            continue
        line = raw_line.rstrip(b"\r\n")
        name, _, value = line.partition(b":")
        if name != b"data":
            continue  # a comment (":..."), or the event, id and retry fields
        data = (data or []) + [value[1:] if value.startswith(b" ") else value]
        size += len(value)
        if size > MAX_REPLY_BYTES:
            raise UpstreamError("bad_response", "agent stream too large")
    raise UpstreamError("bad_response", "agent stream ended without [DONE]")


async def send_evolution(session: aiohttp.ClientSession, inst: Instance, number: str, text: str,
                         timeout_s: float) -> str | None:
    """Send the reply through the Evolution API (number: digits or a JID); any 2xx is success.

    Returns the sent message's key.id from Evolution's answer (receipts name it), or None
    when the answer carries none.
    """
    url = f"{inst.evolution_url}/message/sendText/{inst.evolution_instance}"
    headers = {"apikey": inst.evolution_api_key} if inst.evolution_api_key else {}
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(url, json={"number": number, "text": text}, headers=headers) as resp:
                raw, _ = await _read_up_to(resp, MAX_SEND_ANSWER_BYTES)
                if not 200 <= resp.status < 300:
                    raise UpstreamError(_http_reason(resp.status), f"evolution returned {resp.status}")
                return sent_message_id(raw)
    except TimeoutError:
        raise UpstreamError("timeout", f"evolution timed out after {timeout_s:g} s") from None
    except aiohttp.ClientError as exc:
        raise UpstreamError("connection", f"evolution unreachable: {type(exc).__name__}") from None


def sent_message_id(raw: bytes) -> str | None:
    """key.id of Evolution's sendText answer, if it is there and plausible."""
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    key = data.get("key") if isinstance(data, dict) else None
    msg_id = key.get("id") if isinstance(key, dict) else None
    if isinstance(msg_id, str) and 1 <= len(msg_id) <= 128 and "\x00" not in msg_id:
        return msg_id
    return None
def _retriable(exc: UpstreamError) -> bool:
    """True when the failed send certainly delivered nothing, so sending again cannot make a
    second reply: a 5xx, or a connection that was never established (refused, reset while
    connecting, no route). A timeout or a connection lost after the request went out may
    have delivered it."""
    if exc.reason == "http_5xx":
        return True
    # send_evolution raises `from None`, which hides the aiohttp error but keeps it.
    return exc.reason == "connection" and isinstance(exc.__context__, aiohttp.ClientConnectorError)


async def send_evolution_retrying(session: aiohttp.ClientSession, inst: Instance, digits: str,
                                  text: str, timeout_s: float):
    """send_evolution, repeated after a failure that delivered nothing; (its result, attempts).

    The attempts and their pauses share timeout_s. A final failure carries `attempts`.
    """
    deadline = time.monotonic() + timeout_s
    pause = EVOLUTION_BACKOFF_S
    attempt = 1
    while True:
        try:
            result = await send_evolution(session, inst, digits, text, deadline - time.monotonic())
            return result, attempt
        except UpstreamError as exc:
            if exc.reason == "timeout" and attempt > 1:
                # The attempt's own limit was what was left of the send's: name the whole.
                exc = UpstreamError("timeout", f"evolution timed out after {timeout_s:g} s "
                                               f"({attempt} attempts)")
            exc.attempts = attempt
            left = deadline - time.monotonic() - pause
            if attempt >= EVOLUTION_ATTEMPTS or not _retriable(exc) or left < EVOLUTION_MIN_ATTEMPT_S:
                raise exc from None
        await asyncio.sleep(pause)
        pause *= 2
        attempt += 1
