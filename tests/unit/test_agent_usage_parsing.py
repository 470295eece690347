"""Token usage as agents report it, parsed without servers."""
from __future__ import annotations

import pytest

from app.upstream import parse_usage


def run(service, instance: str, text: str, **kw) -> dict:
    r = service.send(instance, text, **kw)
    assert r.status_code == 202, r.text
    return service.wait_final(r.json()["trace_id"])


@pytest.mark.parametrize("data,want", [
    ({"usage": {"request_tokens": 5, "response_tokens": 7}}, (5, 7)),
    ({"usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}, (5, 7)),
    ({"usage": {"input_tokens": 5, "output_tokens": 7}}, (5, 7)),
    ({"usage": {"input_tokens": 5}}, (5, None)),
    ({"usage": {"input_tokens": 0, "output_tokens": 0}}, (0, 0)),
    ({"usage": {"input_tokens": "5", "output_tokens": -1}}, (None, None)),
    ({"usage": {"input_tokens": True, "output_tokens": 3.0}}, (None, 3)),
    ({"usage": None}, (None, None)),
    ({"usage": [1, 2]}, (None, None)),
    ({}, (None, None)),
    ("not a dict", (None, None)),
])
def test_parse_usage_reads_every_form_and_never_invents_zero(data, want):
    assert parse_usage(data) == want


def test_stream_takes_the_usage_event_over_null_usage_on_chunks():
    """OpenAI-style streams carry `"usage": null` on every chunk and the figures at the end."""
    import asyncio
    import json

    import aiohttp
    from aiohttp import web

    from app.instances import Instance
    from app.upstream import call_agent

    events = [{"content": "Hel", "usage": None}, {"content": "lo", "usage": None},
              {"usage": {"prompt_tokens": 11, "completion_tokens": 2}, "session_id": "s-42"}]

    async def handler(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for event in events:
            await resp.write(f"data: {json.dumps(event)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def main():
        app = web.Application()
        app.router.add_post("/api/v1/agent/{name}/run", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        inst = Instance(id=1, name="x", agent_api_url=f"http://127.0.0.1:{port}", agent_api_key=None,
                        agent_name="default", agent_timeout_s=5, agent_stream=True,
                        evolution_url="http://127.0.0.1:1", evolution_api_key=None, evolution_instance="x",
                        webhook_secret=None, enabled=True)
        try:
            async with aiohttp.ClientSession() as session:
                return await call_agent(session, inst, "hi", "whatsapp:+1", "1")
        finally:
            await runner.cleanup()

    reply = asyncio.run(main())
    assert reply.text == "Hello"
    assert (reply.input_tokens, reply.output_tokens, reply.session_id) == (11, 2, "s-42")
    assert reply.first_chunk_s is not None
