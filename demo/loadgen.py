"""Demo load generator: sends Evolution API v2 webhooks to the gateway at a steady rate.

    python -m demo.loadgen --url http://127.0.0.1:8882 --rate 5 --duration 60

It first makes sure the demo instance exists (creating it against the sandbox),
then sends open-loop: each message is scheduled by the clock, never held back
by slow answers, so the gateway sees the rate asked for.  A share of messages
carries sandbox directives (``#delay=``, ``#status=``, ``#evo_status=``) so the
dashboards show slow and failed messages.  At the end (or on Ctrl-C/SIGTERM) it
prints one JSON summary line to stdout; progress lines go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
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
from typing import Any

import aiohttp

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
    """A demo sender."""

    digits: str
    name: str


def make_personas(count: int, rng: random.Random) -> list[Persona]:
    """Distinct Brazilian-looking mobile numbers with first names."""
    numbers: set[str] = set()
    while len(numbers) < count:
        numbers.add(f"55{rng.randint(11, 99)}9{rng.randint(0, 99_999_999):08d}")
    return [Persona(n, rng.choice(NAMES)) for n in sorted(numbers)]


def pick_text(rng: random.Random, slow_rate: float, fail_rate: float) -> str:
    """A plausible message, sometimes with a slow or failure directive for the sandbox."""
    text = rng.choice(TEXTS)
    if rng.random() < slow_rate:
        text += f" #delay={rng.randint(10_500, 13_000)}"
    if rng.random() < fail_rate:
        text += " " + rng.choice(FAIL_DIRECTIVES)
    return text


# ---------------------------------------------------------------- statistics


@dataclass
class Stats:
    """Counters and a bounded latency sample for the summary."""

    rng: random.Random
    sent: int = 0
    skipped: int = 0
    errors: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
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


async def ensure_instance(session: aiohttp.ClientSession, args: argparse.Namespace) -> str:
    """Create the demo instance unless it exists; returns 'exists' or 'created'."""
    base = args.url.rstrip("/")
    headers = {"x-api-key": args.api_key}
    deadline = time.monotonic() + args.startup_timeout
    status, text = await _retrying(session, "GET", f"{base}/api/v1/instances/{args.instance}",
                                   deadline, headers=headers)
    if status == 200:
        return "exists"
    if status != 404:
        raise SetupError(f"GET instance {args.instance!r} answered {status}: {text[:300]}")
    body = {"name": args.instance, "agent_api_url": args.sandbox_url,
            "evolution_url": args.sandbox_url, "agent_api_key": "demo-agent-key",
            "evolution_api_key": "demo-evolution-key", "agent_timeout_s": 30}
    status, text = await _retrying(session, "POST", f"{base}/api/v1/instances", deadline,
                                   headers=headers, json=body)
    if status in (201, 409):  # 409: another process created it first
        return "created" if status == 201 else "exists"
    raise SetupError(f"creating instance {args.instance!r} answered {status}: {text[:300]}")


# ---------------------------------------------------------------- sending


class Sender:
    """Sends webhooks open-loop at a fixed rate and collects statistics."""

    def __init__(self, session: aiohttp.ClientSession, args: argparse.Namespace,
                 rng: random.Random) -> None:
        self.session = session
        self.args = args
        self.rng = rng
        self.url = f"{args.url.rstrip('/')}/webhook/evolution/{args.instance}"
        self.headers = {"x-webhook-secret": args.webhook_secret} if args.webhook_secret else {}
        self.personas = make_personas(args.users, rng)
        self.stats = Stats(rng=random.Random(rng.random()))
        self.limit = asyncio.Semaphore(args.concurrency)
        self.tasks: set[asyncio.Task[None]] = set()
        # Beyond this many queued sends the target is hopelessly behind; skipping
        # keeps memory bounded instead of piling up tasks forever.
        self.max_backlog = max(1000, args.concurrency * 50)

    def next_envelope(self) -> dict[str, Any]:
        """The next random message envelope."""
        persona = self.rng.choice(self.personas)
        text = pick_text(self.rng, self.args.slow_rate, self.args.fail_rate)
        return build_webhook(self.args.instance, persona.digits, text,
                             message_id=new_message_id(self.rng),
                             extended=self.rng.random() < EXTENDED_SHARE,
                             push_name=persona.name)

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
