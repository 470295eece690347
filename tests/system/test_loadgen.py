"""Tests of the load generator's realistic Evolution traffic (demo.loadgen): each shape's
builder, the mix and its weights, the webhookByEvents URL, and a run against a stub gateway."""
from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path


from demo import loadgen
from tests.support import JsonHandler, LocalHTTPServer

ROOT = Path(__file__).resolve().parents[2]
ID_RE = re.compile(r"3EB0[0-9A-F]{16}")
PERSONA = loadgen.Persona("5511987654321", "Ana", "103899771998284")
NOW = 1766140200.0
ENVELOPE_KEYS = {"event", "instance", "data", "destination", "date_time", "sender",
                 "server_url", "apikey"}


def build(name: str, seed: int = 3, **kw) -> dict:
    """One envelope of the named shape."""
    shape = loadgen.SHAPES_BY_NAME[name]
    return shape.build("demo", PERSONA, "What can you do?", random.Random(seed), now=NOW, **kw)


def check_common(env: dict, message_type: str) -> dict:
    """The fields every shape carries; returns data."""
    assert set(env) == ENVELOPE_KEYS
    assert env["event"] == "messages.upsert" and env["instance"] == "demo"
    assert env["destination"] == "http://omni:8882/webhook/evolution/demo"
    assert env["sender"].endswith("@s.whatsapp.net") and env["apikey"] is None
    assert env["server_url"].startswith("http://")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", env["date_time"])
    data = env["data"]
    assert data["pushName"] == "Ana" and data["status"] == "DELIVERY_ACK"
    assert data["messageType"] == message_type
    assert data["source"] in ("android", "ios", "web")
    assert re.fullmatch(r"[0-9a-f-]{36}", data["instanceId"])
    assert data["messageTimestamp"] in (int(NOW), {"low": int(NOW), "high": 0, "unsigned": False})
    assert data["key"]["fromMe"] is False and ID_RE.fullmatch(data["key"]["id"])
    assert json.loads(json.dumps(env)) == env
    return data


def test_lid_with_phone():
    data = check_common(build("lid_with_phone"), "conversation")
    assert data["key"] == {"remoteJid": "103899771998284@lid",
                           "remoteJidAlt": "5511987654321@s.whatsapp.net", "fromMe": False,
                           "id": data["key"]["id"], "addressingMode": "lid"}
    assert data["message"]["conversation"] == "What can you do?"


def test_lid_sender_pn():
    data = check_common(build("lid_sender_pn"), "conversation")
    assert data["key"]["remoteJid"] == "103899771998284@lid"
    assert data["key"]["senderPn"] == "5511987654321@s.whatsapp.net"
    assert "remoteJidAlt" not in data["key"]


def test_lid_only_has_no_phone_anywhere():
    env = build("lid_only")
    data = check_common(env, "conversation")
    assert set(data["key"]) == {"remoteJid", "fromMe", "id"}
    assert data["key"]["remoteJid"] == "103899771998284@lid"
    assert PERSONA.digits not in json.dumps(env)


def test_phone_jid():
    data = check_common(build("phone_jid"), "conversation")
    assert set(data["key"]) == {"remoteJid", "fromMe", "id"}
    assert data["key"]["remoteJid"] == "5511987654321@s.whatsapp.net"


def test_image_caption():
    image = check_common(build("image_caption"), "imageMessage")["message"]["imageMessage"]
    assert image["caption"] == "What can you do?" and image["mimetype"] == "image/jpeg"
    assert image["url"].startswith("https://mmg.whatsapp.net/")


def test_extended_text():
    data = check_common(build("extended_text"), "extendedTextMessage")
    assert data["message"] == {"extendedTextMessage": {"text": "What can you do?"}}


def test_voice_note():
    audio = check_common(build("voice_note"), "audioMessage")["message"]["audioMessage"]
    assert audio["ptt"] is True and audio["mimetype"] == "audio/ogg; codecs=opus"
    assert isinstance(audio["seconds"], int) and audio["seconds"] > 0


def test_reaction():
    data = check_common(build("reaction"), "reactionMessage")
    reaction = data["message"]["reactionMessage"]
    assert reaction["text"] and set(reaction["key"]) >= {"remoteJid", "fromMe", "id"}
    assert reaction["key"]["remoteJid"] == data["key"]["remoteJid"]
    assert reaction["key"]["id"] != data["key"]["id"]


def test_group():
    data = check_common(build("group"), "conversation")
    assert re.fullmatch(r"\d+@g\.us", data["key"]["remoteJid"])
    assert data["key"]["participant"] == "5511987654321@s.whatsapp.net"


def test_edit():
    data = check_common(build("edit"), "protocolMessage")
    proto = data["message"]["protocolMessage"]
    assert proto["type"] == "MESSAGE_EDIT" and proto["editedMessage"]["conversation"]
    assert set(proto["key"]) >= {"remoteJid", "fromMe", "id"}


def test_builders_are_deterministic_and_take_a_message_id():
    first = build("lid_with_phone", seed=9, message_id="3EB0000000000000ABCD")
    again = build("lid_with_phone", seed=9, message_id="3EB0000000000000ABCD")
    first.pop("date_time"), again.pop("date_time")
    assert first == again and first["data"]["key"]["id"] == "3EB0000000000000ABCD"
    assert build("phone_jid", destination="http://x/webhook/evolution/demo")["destination"] == \
        "http://x/webhook/evolution/demo"


def test_context_info_sometimes_on_text():
    infos = [("messageContextInfo" in build("lid_with_phone", seed=s)["data"]["message"])
             for s in range(400)]
    assert 60 < sum(infos) < 200


def test_long_timestamp_share():
    rng = random.Random(11)
    forms = Counter(type(loadgen.platform_timestamp(rng, NOW)).__name__ for _ in range(5000))
    assert set(forms) == {"int", "dict"}
    assert 0.07 < forms["dict"] / 5000 < 0.13
    rng = random.Random(0)
    longs = [t for t in (loadgen.platform_timestamp(rng, NOW) for _ in range(200)) if isinstance(t, dict)]
    assert longs and all(t == {"low": 1766140200, "high": 0, "unsigned": False} for t in longs)


def test_weights_and_deterministic_selection():
    weights = {s.name: s.weight for s in loadgen.SHAPES}
    assert sum(weights.values()) == 100
    assert weights["lid_with_phone"] == 55 and weights["lid_only"] == 10
    assert len(weights) == len(loadgen.SHAPES) == 10
    rng_a, rng_b = random.Random(42), random.Random(42)
    seq_a = [loadgen.pick_shape(rng_a).name for _ in range(200)]
    assert seq_a == [loadgen.pick_shape(rng_b).name for _ in range(200)]
    rng = random.Random(7)
    counts = Counter(loadgen.pick_shape(rng).name for _ in range(20_000))
    for name, weight in weights.items():
        assert abs(counts[name] / 20_000 - weight / 100) < 0.015, (name, counts[name])


def test_personas_have_distinct_lids():
    people = loadgen.make_personas(200, random.Random(1))
    assert len({p.lid for p in people}) == 200 and len({p.digits for p in people}) == 200
    assert all(re.fullmatch(r"1\d{14}", p.lid) for p in people)
    assert people == loadgen.make_personas(200, random.Random(1))


def _args(**kw) -> argparse.Namespace:
    return loadgen.parse_args(["--url", "http://127.0.0.1:1", "--rate", "1", "--duration", "1",
                               "--api-key", "k", *kw.get("extra", [])])


def _sender(*extra: str, seed: int = 2) -> loadgen.Sender:
    # Sender only builds envelopes here: no session or loop is needed for that.
    return loadgen.Sender(session=None, args=_args(extra=list(extra)), rng=random.Random(seed))


def test_realistic_mix_lid_only_only_for_lids_seen_with_phone():
    sender = _sender("--users", "30")
    seen_with_phone: set[str] = set()
    lid_only = 0
    for _ in range(3000):
        data = sender.next_envelope()["data"]
        key, remote = data["key"], data["key"]["remoteJid"]
        # Only a message the gateway accepts teaches it the LID's phone.
        accepted = data["messageType"] not in IGNORED_TYPES
        if remote.endswith("@lid") and ("remoteJidAlt" in key or "senderPn" in key):
            if accepted:
                seen_with_phone.add(remote)
        elif remote.endswith("@lid"):
            lid_only += 1
            assert remote in seen_with_phone, "a LID alone before it was seen with its phone"
    assert lid_only > 150
    shapes = sender.stats.by_shape
    assert sum(shapes.values()) == 3000 and set(shapes) == set(loadgen.SHAPES_BY_NAME)


def test_text_mix_is_plain_phone_text():
    sender = _sender("--mix", "text")
    for _ in range(200):
        data = sender.next_envelope()["data"]
        assert data["key"]["remoteJid"].endswith("@s.whatsapp.net")
        assert data["messageType"] in ("conversation", "extendedTextMessage")
    assert dict(sender.stats.by_shape) == {"text": 200}
    assert _args().mix == "realistic" and _args().by_events is False


def test_by_events_url():
    assert loadgen.event_path("messages.upsert") == "messages-upsert"
    assert loadgen.event_path("MESSAGES_UPDATE") == "messages-update"
    assert loadgen.webhook_url("http://g:8882/", "demo") == "http://g:8882/webhook/evolution/demo"
    assert loadgen.webhook_url("http://g:8882", "demo", by_events=True) == \
        "http://g:8882/webhook/evolution/demo/messages-upsert"
    assert _sender("--by-events").url == "http://127.0.0.1:1/webhook/evolution/demo/messages-upsert"


# ---------------------------------------------------------------- against a stub gateway

IGNORED_TYPES = {"audioMessage", "reactionMessage", "protocolMessage"}


class Gateway(LocalHTTPServer):
    """Answers like omni: 202 for text, 200 ignored for the rest; records the webhooks."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), GatewayHandler)
        self.lock = threading.Lock()
        self.hooks: list[tuple[str, dict]] = []


class GatewayHandler(JsonHandler):

    def do_GET(self) -> None:
        self._answer(200, {"name": "demo"})  # the instance exists

    def do_POST(self) -> None:
        gateway: Gateway = self.server
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        with gateway.lock:
            gateway.hooks.append((self.path, body))
        data = body["data"]
        if data["messageType"] in IGNORED_TYPES or data["key"]["remoteJid"].endswith("@g.us"):
            self._answer(200, {"status": "ignored", "reason": "x"})
        else:
            self._answer(202, {"status": "accepted", "trace_id": "t", "instance": "demo"})


def test_realistic_run_by_events_counts_ignored_as_200():
    with Gateway() as gateway:
        port = gateway.server_address[1]
        proc = subprocess.run(
            [sys.executable, "-m", "demo.loadgen", "--url", f"http://127.0.0.1:{port}",
             "--api-key", "k", "--rate", "100", "--duration", "2", "--seed", "3", "--by-events"],
            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {path for path, _ in gateway.hooks} == {"/webhook/evolution/demo/messages-upsert"}
    assert summary["sent"] == len(gateway.hooks) >= 150
    assert summary["errors"] == 0
    ignored = sum(1 for _, b in gateway.hooks if b["data"]["messageType"] in IGNORED_TYPES
                  or b["data"]["key"]["remoteJid"].endswith("@g.us"))
    assert ignored > 0
    assert summary["by_status"] == {"200": ignored, "202": len(gateway.hooks) - ignored}
    assert sum(summary["by_shape"].values()) == summary["sent"]
    assert len({b["data"]["key"]["id"] for _, b in gateway.hooks}) == len(gateway.hooks)
