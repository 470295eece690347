"""The two upstream calls of SPEC 4.5: the instance's AI agent and the Evolution API send."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import aiohttp

from app.instances import Instance

MAX_REPLY_BYTES = 1 << 20


class UpstreamError(Exception):
    """An upstream said no or did not answer; `reason` is a metric label, str() the detail."""

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
    return "http_4xx" if status < 500 else "http_5xx"


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
            async with session.post(url, json=body, headers=headers) as resp:
                if resp.status >= 300:
                    raise UpstreamError(_http_reason(resp.status), f"agent returned {resp.status}")
                if inst.agent_stream:
                    return await _read_stream(resp, started)
                return _parse_reply(await resp.read())
    except TimeoutError:
        raise UpstreamError("timeout", f"agent timed out after {inst.agent_timeout_s:g} s") from None
    except aiohttp.ClientError as exc:
        raise UpstreamError("connection", f"agent unreachable: {type(exc).__name__}") from None


def _parse_reply(raw: bytes) -> AgentReply:
    if len(raw) > MAX_REPLY_BYTES:
        raise UpstreamError("bad_response", "agent reply too large")
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
    chunks: list[str] = []
    size = 0
    first: float | None = None
    final_usage: tuple[int | None, int | None] = (None, None)
    session_id: str | None = None
    async for raw_line in resp.content:
        line = raw_line.strip()
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return AgentReply(text="".join(chunks), first_chunk_s=first, input_tokens=final_usage[0],
                              output_tokens=final_usage[1], session_id=session_id)
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
        if "usage" in event and "content" not in event:
            continue  # a usage-only event is not a chunk of the reply
        if first is None:
            first = time.perf_counter() - started
        chunks.append(str(content))
        size += len(payload)
        if size > MAX_REPLY_BYTES:
            raise UpstreamError("bad_response", "agent stream too large")
    raise UpstreamError("bad_response", "agent stream ended without [DONE]")


async def send_evolution(session: aiohttp.ClientSession, inst: Instance, digits: str, text: str,
                         timeout_s: float) -> None:
    """Send the reply through the Evolution API; any 2xx is success."""
    url = f"{inst.evolution_url}/message/sendText/{inst.evolution_instance}"
    headers = {"apikey": inst.evolution_api_key} if inst.evolution_api_key else {}
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(url, json={"number": digits, "text": text}, headers=headers) as resp:
                await resp.read()
                if not 200 <= resp.status < 300:
                    raise UpstreamError(_http_reason(resp.status), f"evolution returned {resp.status}")
    except TimeoutError:
        raise UpstreamError("timeout", f"evolution timed out after {timeout_s:g} s") from None
    except aiohttp.ClientError as exc:
        raise UpstreamError("connection", f"evolution unreachable: {type(exc).__name__}") from None
