"""Demo load generator: sends Evolution API v2 webhooks to the gateway at a steady rate.

    python -m demo.loadgen --url http://127.0.0.1:8882 --rate 5 --duration 60

It first makes sure the demo instance exists (creating it against the sandbox),
then sends open-loop: each message is scheduled by the clock, never held back
by slow answers, so the gateway sees the rate asked for.  A share of messages
carries sandbox directives (``#delay=``, ``#status=``, ``#evo_status=``) so the
dashboards show slow and failed messages.  At the end (or on Ctrl-C/SIGTERM) it
prints one JSON summary line to stdout; progress lines go to stderr.

``--mix realistic`` (the default) sends what Evolution API 2.2-2.3 sends today: mostly
LID-addressed chats (with the phone in ``remoteJidAlt`` or ``senderPn``, or none at all),
phone JIDs, captions, extended text, voice notes, reactions, group messages and edits,
some with ``messageTimestamp`` as a protobuf Long; see ``SHAPES``.  ``--mix text`` sends
plain text messages from phone JIDs only.  ``--by-events`` posts to Evolution's
webhookByEvents URL (``.../{instance}/messages-upsert``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import random
import secrets
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import aiohttp

from demo.sandbox import instance_uuid

DEFAULT_SANDBOX_URL = "http://127.0.0.1:8890"
STARTUP_RETRY_S = 60.0
RESERVOIR_SIZE = 200_000
STOP_GRACE_S = 5.0
EXTENDED_SHARE = 0.2

NAMES = ("Ana", "Bruno", "Carla", "Diego", "Elena", "Felipe", "Gabriela", "Hugo",
         "Isabel", "João", "Karina", "Lucas", "Marina", "Nuno", "Olivia", "Pedro",
         "Rafaela", "Sofia", "Tiago", "Vera")
TEXTS = ("What can you do?", "Hi! Are you open today?", "I need help with my order",
         "Can you tell me the price of the premium plan?", "Thanks, that worked!",
         "How do I reset my password?", "Is delivery free over 100?",
         "Quero falar com um atendente", "Where is my package?",
         "Can I change my appointment to Friday?", "Good morning", "ok",
         "Please send me the invoice for last month",
         "Does the app work on Android?", "What are your opening hours on Sunday?")
FAIL_DIRECTIVES = ("#status=500", "#status=401", "#evo_status=500")
CAPTIONS = ("Is this the right part?", "Here is the receipt", "Look at this",
            "The box arrived like this", "Which size is this?", "Screenshot of the error")
EDITS = ("sorry, I meant Friday", "corrected: order 4521", "never mind, found it")
REACTIONS = ("👍", "❤️", "😂", "🙏", "😮")
SOURCES = ("android", "ios", "web")
# Some Evolution builds serialise messageTimestamp as a protobuf Long object.
LONG_TIMESTAMP_SHARE = 0.1
CONTEXT_INFO_SHARE = 0.3
# Evolution's `sender` is the instance's own WhatsApp number.
INSTANCE_OWNER_JID = "5511900000000@s.whatsapp.net"
SERVER_URL = "http://evolution:8080"


class SetupError(RuntimeError):
    """The gateway could not be reached or refused to set up the instance."""


# ---------------------------------------------------------------- envelopes


def _iso_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_message_id(rng: random.Random | None = None) -> str:
    """A WhatsApp-web style message id: '3EB0' + 16 upper-case hex digits."""
    bits = rng.getrandbits(64) if rng is not None else int.from_bytes(secrets.token_bytes(8), "big")
    return f"3EB0{bits:016X}"


def build_webhook(instance: str, user_digits: str, text: str, message_id: str | None = None,
                  extended: bool = False, push_name: str = "Demo User") -> dict[str, Any]:
    """Build an Evolution API v2 `messages.upsert` webhook envelope for one text message."""
    digits = str(user_digits).lstrip("+")
    if not digits.isdigit():
        raise ValueError(f"user_digits must be digits, got {user_digits!r}")
    if extended:
        message: dict[str, Any] = {"extendedTextMessage": {"text": text}}
        message_type = "extendedTextMessage"
    else:
        message, message_type = {"conversation": text}, "conversation"
    return {
        "event": "messages.upsert",
        "instance": instance,
        "data": {
            "key": {"remoteJid": f"{digits}@s.whatsapp.net", "fromMe": False,
                    "id": message_id or new_message_id()},
            "pushName": push_name,
            "message": message,
            "messageType": message_type,
            "messageTimestamp": int(time.time()),
        },
        "date_time": _iso_now(),
        "server_url": "http://evolution:8080",
        "apikey": None,
    }


@dataclass(frozen=True)
class Persona:
    """A demo sender: phone digits, first name and WhatsApp LID."""

    digits: str
    name: str
    lid: str = ""


def make_personas(count: int, rng: random.Random) -> list[Persona]:
    """Distinct Brazilian-looking mobile numbers with first names and distinct LIDs."""
    numbers: set[str] = set()
    while len(numbers) < count:
        numbers.add(f"55{rng.randint(11, 99)}9{rng.randint(0, 99_999_999):08d}")
    people = [(n, rng.choice(NAMES)) for n in sorted(numbers)]
    lids: list[str] = []
    while len(lids) < count:
        lid = f"1{rng.randint(0, 10**14 - 1):014d}"
        if lid not in lids:
            lids.append(lid)
    return [Persona(n, name, lid) for (n, name), lid in zip(people, lids)]


def pick_text(rng: random.Random, slow_rate: float, fail_rate: float) -> str:
    """A plausible message, sometimes with a slow or failure directive for the sandbox."""
    text = rng.choice(TEXTS)
    if rng.random() < slow_rate:
        text += f" #delay={rng.randint(10_500, 13_000)}"
    if rng.random() < fail_rate:
        text += " " + rng.choice(FAIL_DIRECTIVES)
    return text


# ---------------------------------------------------------------- realistic shapes


def platform_timestamp(rng: random.Random, now: float | None = None) -> int | dict[str, Any]:
    """WhatsApp's messageTimestamp: int seconds, sometimes the Long object form."""
    seconds = int(time.time() if now is None else now)
    if rng.random() < LONG_TIMESTAMP_SHARE:
        return {"low": seconds, "high": 0, "unsigned": False}
    return seconds


def _phone_jid(persona: Persona) -> str:
    return f"{persona.digits}@s.whatsapp.net"


def _lid_jid(persona: Persona) -> str:
    return f"{persona.lid}@lid"


def _b64(rng: random.Random, size: int) -> str:
    return base64.b64encode(rng.getrandbits(size * 8).to_bytes(size, "big")).decode()


def _context_info(rng: random.Random) -> dict[str, Any]:
    stamp = str(int(time.time()) - rng.randint(3600, 30 * 86400))
    return {"deviceListMetadata": {"senderKeyHash": _b64(rng, 10), "senderTimestamp": stamp,
                                   "recipientKeyHash": _b64(rng, 10), "recipientTimestamp": stamp},
            "deviceListMetadataVersion": 2,
            "messageSecret": _b64(rng, 32)}


def _text_message(rng: random.Random, text: str) -> dict[str, Any]:
    message: dict[str, Any] = {"conversation": text}
    if rng.random() < CONTEXT_INFO_SHARE:
        message["messageContextInfo"] = _context_info(rng)
    return message


def _media_url(rng: random.Random, kind: str) -> str:
    return f"https://mmg.whatsapp.net/v/t62.{kind}-24/{rng.getrandbits(64):016x}.enc?ccb=11-4"


def evolution_envelope(instance: str, key: dict[str, Any], push_name: str,
                       message: dict[str, Any], message_type: str, rng: random.Random,
                       destination: str | None = None, now: float | None = None) -> dict[str, Any]:
    """A `messages.upsert` envelope with every field Evolution 2.3 puts in it."""
    return {
        "event": "messages.upsert",
        "instance": instance,
        "data": {
            "key": key,
            "pushName": push_name,
            "status": "DELIVERY_ACK",
            "message": message,
            "messageType": message_type,
            "messageTimestamp": platform_timestamp(rng, now),
            "instanceId": instance_uuid(instance),
            "source": rng.choice(SOURCES),
        },
        "destination": destination or f"http://omni:8882/webhook/evolution/{instance}",
        "date_time": _iso_now(),
        "sender": INSTANCE_OWNER_JID,
        "server_url": SERVER_URL,
        "apikey": None,
    }


def _key(remote_jid: str, message_id: str | None, rng: random.Random, **extra: Any) -> dict[str, Any]:
    return {"remoteJid": remote_jid, "fromMe": False,
            "id": message_id or new_message_id(rng), **extra}


def build_lid_with_phone(instance: str, persona: Persona, text: str, rng: random.Random,
                         message_id: str | None = None, **kw: Any) -> dict[str, Any]:
    """A LID chat with the phone in key.remoteJidAlt (most traffic on Evolution 2.3)."""
    key = _key(_lid_jid(persona), message_id, rng, remoteJidAlt=_phone_jid(persona),
               addressingMode="lid")
    return evolution_envelope(instance, key, persona.name, _text_message(rng, text),
                              "conversation", rng, **kw)


def build_lid_sender_pn(instance: str, persona: Persona, text: str, rng: random.Random,
                        message_id: str | None = None, **kw: Any) -> dict[str, Any]:
    """A LID chat with the phone in key.senderPn (Evolution 2.3.0 builds)."""
    key = _key(_lid_jid(persona), message_id, rng, senderPn=_phone_jid(persona))
    return evolution_envelope(instance, key, persona.name, _text_message(rng, text),
                              "conversation", rng, **kw)


def build_lid_only(instance: str, persona: Persona, text: str, rng: random.Random,
                   message_id: str | None = None, **kw: Any) -> dict[str, Any]:
    """A LID chat with no phone anywhere."""
    key = _key(_lid_jid(persona), message_id, rng)
    return evolution_envelope(instance, key, persona.name, _text_message(rng, text),
                              "conversation", rng, **kw)


def build_phone_jid(instance: str, persona: Persona, text: str, rng: random.Random,
                    message_id: str | None = None, **kw: Any) -> dict[str, Any]:
    """A chat addressed by phone JID, as before the LID migration."""
    key = _key(_phone_jid(persona), message_id, rng)
    return evolution_envelope(instance, key, persona.name, _text_message(rng, text),
                              "conversation", rng, **kw)


def build_image_caption(instance: str, persona: Persona, text: str, rng: random.Random,
                        message_id: str | None = None, **kw: Any) -> dict[str, Any]:
    """An image whose caption is the text."""
    key = _key(_lid_jid(persona), message_id, rng, remoteJidAlt=_phone_jid(persona),
               addressingMode="lid")
    message = {"imageMessage": {"url": _media_url(rng, "7118"), "mimetype": "image/jpeg",
                                "caption": text, "height": 1280, "width": 960}}
    return evolution_envelope(instance, key, persona.name, message, "imageMessage", rng, **kw)


def build_extended_text(instance: str, persona: Persona, text: str, rng: random.Random,
                        message_id: str | None = None, **kw: Any) -> dict[str, Any]:
    """An extendedTextMessage (a text with a link preview or a quote)."""
    key = _key(_lid_jid(persona), message_id, rng, remoteJidAlt=_phone_jid(persona),
               addressingMode="lid")
    return evolution_envelope(instance, key, persona.name, {"extendedTextMessage": {"text": text}},
                              "extendedTextMessage", rng, **kw)


def build_voice_note(instance: str, persona: Persona, text: str, rng: random.Random,
                     message_id: str | None = None, **kw: Any) -> dict[str, Any]:
    """A voice note: audioMessage with ptt (no text to answer)."""
    key = _key(_lid_jid(persona), message_id, rng, remoteJidAlt=_phone_jid(persona),
               addressingMode="lid")
    message = {"audioMessage": {"url": _media_url(rng, "7117"),
                                "mimetype": "audio/ogg; codecs=opus",
                                "seconds": rng.randint(1, 90), "ptt": True}}
    return evolution_envelope(instance, key, persona.name, message, "audioMessage", rng, **kw)


def build_reaction(instance: str, persona: Persona, text: str, rng: random.Random,
                   message_id: str | None = None, **kw: Any) -> dict[str, Any]:
    """A reaction to one of our replies."""
    remote = _lid_jid(persona)
    key = _key(remote, message_id, rng, remoteJidAlt=_phone_jid(persona), addressingMode="lid")
    reacted = {"remoteJid": remote, "fromMe": True, "id": new_message_id(rng)}
    message = {"reactionMessage": {"key": reacted, "text": rng.choice(REACTIONS),
                                   "senderTimestampMs": str(int(time.time() * 1000))}}
    return evolution_envelope(instance, key, persona.name, message, "reactionMessage", rng, **kw)


def build_group(instance: str, persona: Persona, text: str, rng: random.Random,
                message_id: str | None = None, **kw: Any) -> dict[str, Any]:
    """A message in a group the instance belongs to."""
    group = f"120363{rng.randint(0, 10**12 - 1):012d}@g.us"
    key = _key(group, message_id, rng, participant=_phone_jid(persona))
    return evolution_envelope(instance, key, persona.name, _text_message(rng, text),
                              "conversation", rng, **kw)


def build_edit(instance: str, persona: Persona, text: str, rng: random.Random,
               message_id: str | None = None, **kw: Any) -> dict[str, Any]:
    """An edit of an earlier message: protocolMessage MESSAGE_EDIT."""
    remote = _lid_jid(persona)
    key = _key(remote, message_id, rng, remoteJidAlt=_phone_jid(persona), addressingMode="lid")
    edited = {"remoteJid": remote, "fromMe": False, "id": new_message_id(rng)}
    message = {"protocolMessage": {"key": edited, "type": "MESSAGE_EDIT",
                                   "editedMessage": {"conversation": rng.choice(EDITS)},
                                   "timestampMs": str(int(time.time() * 1000))}}
    return evolution_envelope(instance, key, persona.name, message, "protocolMessage", rng, **kw)


@dataclass(frozen=True)
class Shape:
    """One kind of Evolution webhook in the realistic mix."""

    name: str
    weight: float
    build: Callable[..., dict[str, Any]]
    # The gateway can map this LID to a phone only after it saw both together.
    needs_known_lid: bool = False
    # Carries the persona's phone beside its LID in a message the gateway accepts: only
    # those teach it the mapping (ignored messages are not read that far).
    shows_phone: bool = False


# Weights are percentages of the traffic (they sum to 100).
SHAPES: tuple[Shape, ...] = (
    Shape("lid_with_phone", 55, build_lid_with_phone, shows_phone=True),
    Shape("lid_sender_pn", 5, build_lid_sender_pn, shows_phone=True),
    Shape("lid_only", 10, build_lid_only, needs_known_lid=True),
    Shape("phone_jid", 10, build_phone_jid),
    Shape("image_caption", 5, build_image_caption, shows_phone=True),
    Shape("extended_text", 5, build_extended_text, shows_phone=True),
    Shape("voice_note", 3, build_voice_note),
    Shape("reaction", 3, build_reaction),
    Shape("group", 2, build_group),
    Shape("edit", 2, build_edit),
)
SHAPES_BY_NAME = {shape.name: shape for shape in SHAPES}


def pick_shape(rng: random.Random, shapes: tuple[Shape, ...] = SHAPES) -> Shape:
    """One shape, drawn by weight."""
    return rng.choices(shapes, weights=[s.weight for s in shapes])[0]


def event_path(event: str) -> str:
    """Evolution's webhookByEvents suffix for an event: 'messages.upsert' -> 'messages-upsert'."""
    return event.lower().replace("_", "-").replace(".", "-")


def webhook_url(base_url: str, instance: str, by_events: bool = False,
                event: str = "messages.upsert") -> str:
    """Where Evolution posts an instance's webhooks (with the event suffix when by_events)."""
    url = f"{base_url.rstrip('/')}/webhook/evolution/{instance}"
    return f"{url}/{event_path(event)}" if by_events else url


# ---------------------------------------------------------------- statistics


@dataclass
class Stats:
    """Counters and a bounded latency sample for the summary."""

    rng: random.Random
    sent: int = 0
    skipped: int = 0
    errors: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    by_shape: Counter[str] = field(default_factory=Counter)
    error_kinds: Counter[str] = field(default_factory=Counter)
    samples: list[float] = field(default_factory=list)
    seen: int = 0
    max_ms: float = 0.0

    def record_ack(self, status: int, ms: float) -> None:
        """Count one answer and keep its latency in a reservoir sample."""
        self.by_status[str(status)] += 1
        self.max_ms = max(self.max_ms, ms)
        self.seen += 1
        # Reservoir sampling keeps memory bounded when running for days.
        if len(self.samples) < RESERVOIR_SIZE:
            self.samples.append(ms)
        else:
            slot = self.rng.randrange(self.seen)
            if slot < RESERVOIR_SIZE:
                self.samples[slot] = ms

    def record_error(self, kind: str) -> None:
        """Count a request that got no HTTP answer."""
        self.errors += 1
        self.error_kinds[kind] += 1

    def percentiles(self) -> dict[str, float | None]:
        """p50, p99 and max of the answer latency in ms (None without answers)."""
        if not self.samples:
            return {"p50": None, "p99": None, "max": None}
        ordered = sorted(self.samples)

        def pick(q: float) -> float:
            return round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)], 1)

        return {"p50": pick(0.50), "p99": pick(0.99), "max": round(self.max_ms, 1)}

    def summary(self, elapsed_s: float) -> dict[str, Any]:
        """The final one-line JSON summary."""
        return {
            "sent": self.sent,
            "by_status": dict(sorted(self.by_status.items())),
            "errors": self.errors,
            "ack_ms": self.percentiles(),
            "skipped": self.skipped,
            "error_kinds": dict(self.error_kinds),
            "by_shape": dict(sorted(self.by_shape.items())),
            "elapsed_s": round(elapsed_s, 2),
        }


# ---------------------------------------------------------------- instance setup


async def _request(session: aiohttp.ClientSession, method: str, url: str,
                   **kwargs: Any) -> tuple[int, str]:
    async with session.request(method, url, **kwargs) as resp:
        return resp.status, await resp.text()


async def _retrying(session: aiohttp.ClientSession, method: str, url: str, deadline: float,
                    **kwargs: Any) -> tuple[int, str]:
    # In compose the load generator may start before the gateway listens.
    while True:
        try:
            status, text = await _request(session, method, url, **kwargs)
            if status < 500 or time.monotonic() >= deadline:
                return status, text
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            if time.monotonic() >= deadline:
                raise SetupError(f"gateway not reachable at {url}: {exc}") from exc
        await asyncio.sleep(0.5)


async def ensure_instance(session: aiohttp.ClientSession, args: argparse.Namespace,
                          name: str | None = None) -> str:
    """Create the demo instance (or the named one) unless it exists; returns 'exists' or 'created'."""
    name = name or args.instance
    base = args.url.rstrip("/")
    headers = {"x-api-key": args.api_key}
    deadline = time.monotonic() + args.startup_timeout
    status, text = await _retrying(session, "GET", f"{base}/api/v1/instances/{name}",
                                   deadline, headers=headers)
    if status == 200:
        return "exists"
    if status != 404:
        raise SetupError(f"GET instance {name!r} answered {status}: {text[:300]}")
    body = {"name": name, "agent_api_url": args.sandbox_url,
            "evolution_url": args.sandbox_url, "agent_api_key": "demo-agent-key",
            "evolution_api_key": "demo-evolution-key", "agent_timeout_s": 30}
    if name == args.instance:
        # Plausible list prices (USD per million tokens) so the demo's cost panels and
        # the cost-burn alert have figures to show; the canary's messages cost nothing.
        body.update(input_cost_per_mtok=3, output_cost_per_mtok=15)
    status, text = await _retrying(session, "POST", f"{base}/api/v1/instances", deadline,
                                   headers=headers, json=body)
    if status in (201, 409):  # 409: another process created it first
        return "created" if status == 201 else "exists"
    raise SetupError(f"creating instance {name!r} answered {status}: {text[:300]}")


# ---------------------------------------------------------------- sending


class Sender:
    """Sends webhooks open-loop at a fixed rate and collects statistics."""

    def __init__(self, session: aiohttp.ClientSession, args: argparse.Namespace,
                 rng: random.Random) -> None:
        self.session = session
        self.args = args
        self.rng = rng
        self.url = webhook_url(args.url, args.instance, by_events=args.by_events)
        self.headers = {"x-webhook-secret": args.webhook_secret} if args.webhook_secret else {}
        self.personas = make_personas(args.users, rng)
        self.stats = Stats(rng=random.Random(rng.random()))
        self.limit = asyncio.Semaphore(args.concurrency)
        self.tasks: set[asyncio.Task[None]] = set()
        # Beyond this many queued sends the target is hopelessly behind; skipping
        # keeps memory bounded instead of piling up tasks forever.
        self.max_backlog = max(1000, args.concurrency * 50)
        # Personas whose LID was already sent beside their phone, in order of first sight.
        self.known_lids: list[Persona] = []
        self._known: set[str] = set()

    def next_envelope(self) -> dict[str, Any]:
        """The next random message envelope."""
        if self.args.mix == "text":
            return self._text_envelope()
        return self._realistic_envelope()

    def _text_envelope(self) -> dict[str, Any]:
        persona = self.rng.choice(self.personas)
        text = pick_text(self.rng, self.args.slow_rate, self.args.fail_rate)
        self.stats.by_shape["text"] += 1
        return build_webhook(self.args.instance, persona.digits, text,
                             message_id=new_message_id(self.rng),
                             extended=self.rng.random() < EXTENDED_SHARE,
                             push_name=persona.name)

    def _realistic_envelope(self) -> dict[str, Any]:
        shape = pick_shape(self.rng)
        if shape.needs_known_lid and self.known_lids:
            persona = self.rng.choice(self.known_lids)
        else:
            if shape.needs_known_lid:
                # No LID seen with its phone yet: this one teaches the gateway first.
                shape = SHAPES_BY_NAME["lid_with_phone"]
            persona = self.rng.choice(self.personas)
        if shape.shows_phone and persona.lid not in self._known:
            self._known.add(persona.lid)
            self.known_lids.append(persona)
        text = pick_text(self.rng, self.args.slow_rate, self.args.fail_rate)
        self.stats.by_shape[shape.name] += 1
        return shape.build(self.args.instance, persona, text, self.rng,
                           message_id=new_message_id(self.rng), destination=self.url)

    async def send_one(self, envelope: dict[str, Any], scheduled: float) -> None:
        """POST one webhook; latency counts from the scheduled time (no coordinated omission)."""
        async with self.limit:
            try:
                async with self.session.post(self.url, json=envelope,
                                             headers=self.headers) as resp:
                    await resp.read()
                    self.stats.record_ack(resp.status, (time.monotonic() - scheduled) * 1000)
            except asyncio.TimeoutError:
                self.stats.record_error("timeout")
            except aiohttp.ClientError as exc:
                self.stats.record_error(type(exc).__name__)

    def launch(self, scheduled: float) -> None:
        """Start one send in the background (or skip it when hopelessly behind)."""
        if len(self.tasks) >= self.max_backlog:
            self.stats.skipped += 1
            return
        self.stats.sent += 1
        task = asyncio.create_task(self.send_one(self.next_envelope(), scheduled))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run(self, stop: asyncio.Event) -> None:
        """Schedule sends by the clock until the duration ends or stop is set."""
        start = time.monotonic()
        interval = 1.0 / self.args.rate
        end = start + self.args.duration if self.args.duration > 0 else math.inf
        index = 0
        while not stop.is_set():
            scheduled = start + index * interval
            if scheduled >= end:
                break
            await _sleep_until(scheduled, stop)
            if stop.is_set():
                break
            self.launch(scheduled)
            index += 1

    async def drain(self, timeout: float) -> None:
        """Wait for in-flight sends, cancelling whatever is left after timeout."""
        if not self.tasks:
            return
        _, pending = await asyncio.wait(set(self.tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
            self.stats.errors += len(pending)
            self.stats.error_kinds["cancelled"] += len(pending)


async def _sleep_until(when: float, stop: asyncio.Event) -> None:
    delay = when - time.monotonic()
    if delay <= 0.05:
        # Short waits (or catching up when behind) use a plain sleep: cheaper than
        # a wait_for per message, and sleep(0) still lets answers be processed.
        await asyncio.sleep(max(delay, 0))
        return
    try:
        await asyncio.wait_for(stop.wait(), timeout=delay)
    except asyncio.TimeoutError:
        pass


async def _report_progress(sender: Sender, every: float, started: float) -> None:
    while True:
        await asyncio.sleep(every)
        stats = sender.stats
        line = {"t_s": round(time.monotonic() - started, 1), "sent": stats.sent,
                "in_flight": len(sender.tasks), "by_status": dict(stats.by_status),
                "errors": stats.errors, "skipped": stats.skipped}
        print(f"loadgen progress {json.dumps(line)}", file=sys.stderr, flush=True)


def _install_stop_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass  # not on the main thread or not on Unix: Ctrl-C still raises


async def _unless_stopped(coro: Any, stop: asyncio.Event) -> Any:
    # A signal during the start-up retries must not wait for the 60 s to pass.
    task = asyncio.ensure_future(coro)
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return None


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Set up the instance, send for the duration, and return the summary."""
    stop = asyncio.Event()
    _install_stop_handlers(stop)
    rng = random.Random(args.seed)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    connector = aiohttp.TCPConnector(limit=args.concurrency, limit_per_host=args.concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        outcome = await _unless_stopped(ensure_instance(session, args), stop)
        if outcome is None:
            return Stats(rng=rng).summary(0.0)
        if args.canary_instance:
            made = await _unless_stopped(ensure_instance(session, args, args.canary_instance), stop)
            if made is None:
                return Stats(rng=rng).summary(0.0)
            print(f"loadgen: canary instance {args.canary_instance!r} {made}", file=sys.stderr, flush=True)
        print(f"loadgen: instance {args.instance!r} {outcome}; sending {args.rate:g}/s "
              f"to {args.url}", file=sys.stderr, flush=True)
        sender = Sender(session, args, rng)
        started = time.monotonic()
        progress = asyncio.create_task(_report_progress(sender, args.progress_interval, started))
        try:
            await sender.run(stop)
            # After a signal, do not wait long for answers; otherwise up to the timeout.
            await sender.drain(STOP_GRACE_S if stop.is_set() else args.timeout)
        finally:
            progress.cancel()
        return sender.stats.summary(time.monotonic() - started)


# ---------------------------------------------------------------- command line


def _share(value: str) -> float:
    share = float(value)
    if not 0.0 <= share <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and 1")
    return share


def _positive(kind: type) -> Any:
    def parse(value: str) -> Any:
        number = kind(value)
        if not number > 0 or (isinstance(number, float) and not math.isfinite(number)):
            raise argparse.ArgumentTypeError(f"{value} must be > 0")
        return number
    return parse


def _non_negative(value: str) -> float:
    number = float(value)
    if not (number >= 0 and math.isfinite(number)):
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return number


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (defaults from the environment where documented)."""
    p = argparse.ArgumentParser(prog="python -m demo.loadgen",
                                description="Send Evolution API webhooks to the gateway.")
    p.add_argument("--url", required=True, help="gateway base URL, e.g. http://127.0.0.1:8882")
    p.add_argument("--rate", type=_positive(float), required=True, help="messages per second")
    p.add_argument("--duration", type=_non_negative, required=True,
                   help="seconds to send; 0 = until interrupted")
    p.add_argument("--instance", default="demo")
    p.add_argument("--canary-instance", default=None,
                   help="also create this instance against the sandbox, for the service's canary "
                        "(AUTOMAGIK_OMNI_CANARY_INSTANCE); it gets no traffic from here")
    p.add_argument("--users", type=_positive(int), default=50, help="distinct senders")
    p.add_argument("--api-key", default=None,
                   help="gateway x-api-key (default $AUTOMAGIK_OMNI_API_KEY, or the file named "
                        "by $AUTOMAGIK_OMNI_API_KEY_FILE)")
    p.add_argument("--sandbox-url", default=os.environ.get("SANDBOX_URL") or DEFAULT_SANDBOX_URL,
                   help="agent/Evolution URL stored in a created instance (default $SANDBOX_URL)")
    p.add_argument("--slow-rate", type=_share, default=0.02,
                   help="share of messages asking the sandbox for a 10.5-13 s delay")
    p.add_argument("--fail-rate", type=_share, default=0.03,
                   help="share of messages asking for an agent 500/401 or Evolution 500")
    p.add_argument("--webhook-secret", default=None, help="sent as header x-webhook-secret")
    p.add_argument("--mix", choices=("realistic", "text"), default="realistic",
                   help="realistic: Evolution 2.3 traffic (LIDs, media, reactions, groups, "
                        "edits); text: plain text messages from phone JIDs")
    p.add_argument("--by-events", action="store_true",
                   help="post to Evolution's webhookByEvents URL .../{instance}/messages-upsert")
    p.add_argument("--concurrency", type=_positive(int), default=64,
                   help="max in-flight HTTP requests")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--timeout", type=_positive(float), default=30.0,
                   help="per-request timeout in seconds")
    p.add_argument("--startup-timeout", type=_non_negative, default=STARTUP_RETRY_S,
                   help="how long to wait for the gateway at start")
    p.add_argument("--progress-interval", type=_positive(float), default=10.0,
                   help="seconds between progress lines on stderr")
    args = p.parse_args(argv)
    if not args.api_key:
        # The same rules as the service's own settings (a file keeps the key out of argv).
        from app.config import ConfigError, read_variable
        try:
            args.api_key = (read_variable(os.environ, "AUTOMAGIK_OMNI_API_KEY") or "").strip()
        except ConfigError as exc:
            p.error(str(exc))
    if not args.api_key:
        p.error("--api-key, AUTOMAGIK_OMNI_API_KEY or AUTOMAGIK_OMNI_API_KEY_FILE is required")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point: exit 0 after a normal run or a clean interrupt, 1 if setup failed."""
    args = parse_args(argv)
    try:
        summary = asyncio.run(run(args))
    except SetupError as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Only reachable when signal handlers could not be installed.
        return 130
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
