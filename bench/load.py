"""Load generators: wrk (closed loop, for throughput) and demo.loadgen (open loop, for latency)."""
from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from demo.loadgen import build_webhook
from demo.processes import PYTHON, ROOT

LUA = Path(__file__).resolve().parent / "webhook.lua"


def body_template(instance: str) -> str:
    """The webhook body (same builder as the demo load generator) with placeholders."""
    body = build_webhook(instance, "5511900000000", "What can you do? I need help with my order",
                         message_id="__MSGID__", push_name="Ana")
    body["data"]["key"]["remoteJid"] = "__DIGITS__@s.whatsapp.net"
    return json.dumps(body)


def wrk(base_url: str, instance: str, tag: str, duration_s: float, connections: int = 32,
        threads: int = 1, delay_ms: int | None = None) -> dict:
    """Closed-loop POSTs of unique webhooks for duration_s; wrk's summary as a dict.

    With delay_ms each connection pauses that long before each request: about
    connections * 1000 / (delay_ms + latency) requests a second, a steady load below saturation.
    """
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        fh.write(body_template(instance))
        template = fh.name
    try:
        out = subprocess.run(
            ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration_s:g}s",
             "--timeout", "10s", "-s", str(LUA), base_url, "--", template, tag,
             f"/webhook/evolution/{instance}"] + ([str(delay_ms)] if delay_ms is not None else []),
            capture_output=True, text=True, check=True, timeout=duration_s + 60)
    finally:
        Path(template).unlink(missing_ok=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1]
    res = json.loads(line)
    res["ok"] = res["requests"] - res["non2xx"]
    res["rps"] = res["requests"] / (res["duration_us"] / 1e6)
    return res


def open_loop(base_url: str, api_key: str, sandbox_url: str, instance: str, rate: float,
              duration_s: float, users: int = 10_000) -> subprocess.Popen:
    """demo.loadgen as its own process: open loop at `rate`, no slow or failing directives."""
    return subprocess.Popen(
        [PYTHON, "-m", "demo.loadgen", "--url", base_url, "--rate", f"{rate:g}",
         "--duration", f"{duration_s:g}", "--instance", instance, "--users", str(users),
         "--api-key", api_key, "--sandbox-url", sandbox_url, "--slow-rate", "0",
         "--fail-rate", "0", "--concurrency", "1000", "--timeout", "30", "--seed", "5",
         "--progress-interval", "3600"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
