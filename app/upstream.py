"""The two upstream calls of SPEC 4.5: the instance's AI agent and the Evolution API send."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import aiohttp

from app.instances import Instance

MAX_REPLY_BYTES = 1 << 20
# sendText answers with the sent message (a few hundred bytes); the id is all we read of it.
MAX_SEND_ANSWER_BYTES = 64 << 10


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
    return AgentReply(text=data["message"])


async def _read_stream(resp: aiohttp.ClientResponse, started: float) -> AgentReply:
    chunks: list[str] = []
    size = 0
    first: float | None = None
    async for raw_line in resp.content:
        line = raw_line.strip()
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return AgentReply(text="".join(chunks), first_chunk_s=first)
        try:
            content = json.loads(payload).get("content", "")
        except (ValueError, AttributeError):
            raise UpstreamError("bad_response", "agent stream sent an invalid chunk") from None
        if first is None:
            first = time.perf_counter() - started
        chunks.append(str(content))
        size += len(payload)
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
                raw = await _read_bounded(resp, MAX_SEND_ANSWER_BYTES)
                if not 200 <= resp.status < 300:
                    raise UpstreamError(_http_reason(resp.status), f"evolution returned {resp.status}")
                return sent_message_id(raw)
    except TimeoutError:
        raise UpstreamError("timeout", f"evolution timed out after {timeout_s:g} s") from None
    except aiohttp.ClientError as exc:
        raise UpstreamError("connection", f"evolution unreachable: {type(exc).__name__}") from None


async def _read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, or its first `limit` bytes (enough to tell; the rest is not waited for)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(16 << 10):
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)


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
