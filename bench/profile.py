"""CPU profile of one gunicorn worker with py-spy, summarised by where the time goes."""
from __future__ import annotations

import collections
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from demo.processes import PYTHON

# First match walking from the leaf frame towards the root decides a sample's category;
# generic modules (json, re, uuid, threading, ...) are skipped so their time goes to
# whoever called them (json.dumps in a log formatter counts as logging).
CATEGORIES = (
    ("json logging + Loki push", ("/logging/", "app/telemetry/logs.py",
                                  "app/telemetry/loki.py", "gzip.py", "http/client.py")),
    ("prometheus", ("prometheus_client", "app/telemetry/metrics.py", "app/telemetry/recorder.py",
                    "mmap_dict")),
    ("psycopg2 / trace writer", ("psycopg2", "app/traces/", "app/db.py")),
    ("aiohttp upstream calls (pipeline loop)", ("aiohttp", "yarl", "multidict", "asyncio",
                                                "app/upstream.py", "app/pipeline/")),
    ("flask / werkzeug + webhook handler", ("flask", "werkzeug", "app/web/", "app/__init__.py",
                                            "app/runtime.py", "app/instances")),
    ("gunicorn (HTTP parsing, sockets)", ("gunicorn", "selectors.py", "socket.py", "ssl.py")),
)
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def available() -> bool:
    """py-spy installed next to the interpreter or on PATH."""
    return bool(_binary())


def _binary() -> str | None:
    local = Path(PYTHON).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def record(pid: int, seconds: float, rate: int = 200) -> Path:
    """Sample pid for seconds; collapsed stacks file.

    --gil keeps only the samples of the thread holding the GIL, i.e. Python CPU time: waits
    (locks, select, queue gets) drop out instead of masquerading as work.
    """
    out = Path(tempfile.mktemp(prefix="omni-pyspy-", suffix=".txt"))
    subprocess.run([_binary(), "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))),
                    "--rate", str(rate), "--format", "raw", "--nonblocking", "--gil", "--threads",
                    "--output", str(out)], check=True, capture_output=True, timeout=seconds + 60)
    return out


def categorize(stack: list[str]) -> str:
    for frame in reversed(stack):
        m = FRAME.match(frame)
        path = m.group("file") if m else frame
        for name, needles in CATEGORIES:
            if any(n in path for n in needles):
                return name
    return "other (python stdlib, app glue)"


def summarize(path: Path, top: int = 12) -> dict:
    """Share of samples per category, per thread, and the hottest leaf frames."""
    cats: collections.Counter = collections.Counter()
    threads: collections.Counter = collections.Counter()
    leaves: collections.Counter = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack_txt, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack_txt.split(";")
        thread = frames[0] if frames and frames[0].startswith(("thread", "process")) else ""
        frames = [f for f in frames if not f.startswith(("thread", "process"))]
        total += n
        cats[categorize(frames)] += n
        threads[_thread_name(thread)] += n
        if frames:
            leaves[frames[-1]] += n
    share = {k: round(v / total, 4) for k, v in cats.most_common()} if total else {}
    return {"samples": total, "by_category": share,
            "by_thread": {k: round(v / total, 4) for k, v in threads.most_common()} if total else {},
            "top_leaf_frames": [{"frame": f, "share": round(v / total, 4)}
                                for f, v in leaves.most_common(top)] if total else []}


def _thread_name(label: str) -> str:
    # py-spy labels look like: thread (0x7f...): "name"  or  thread (1234): name
    m = re.search(r'\)\s*:?\s*"?([^"]*)"?\s*$', label)
    name = m.group(1).strip() if m else label
    # gunicorn's request threads are a ThreadPoolExecutor: fold their numbered names.
    return re.sub(r"_\d+$", "_N", name) or "main"
