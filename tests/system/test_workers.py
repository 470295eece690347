"""gunicorn worker settings made for throughput: garbage-collector tuning and connection spreading."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import psutil

from tests.support import PYTHON, ROOT

HOOK = """
import gc, json, runpy
conf = runpy.run_path("app/gunicorn.conf.py")
before = {"threshold": gc.get_threshold(), "frozen": gc.get_freeze_count()}
conf["post_worker_init"](None)
print(json.dumps({"before": before, "after": {"threshold": gc.get_threshold(),
                                              "frozen": gc.get_freeze_count()},
                  "worker_connections": conf["worker_connections"]}))
"""


def test_worker_hook_freezes_what_loading_made_and_collects_less_often():
    """post_worker_init (run by gunicorn in each worker once the app is loaded) moves the
    objects made so far out of the collector's reach and raises the young-generation
    threshold from 700 to 10,000."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOMAGIK_OMNI_")}
    env.update(AUTOMAGIK_OMNI_API_KEY="a-good-api-key-123", AUTOMAGIK_OMNI_THREADS="8",
               AUTOMAGIK_OMNI_DATABASE_URL="postgresql://nobody@127.0.0.1:1/none")
    out = subprocess.run([PYTHON, "-c", HOOK], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["before"] == {"threshold": [700, 10, 10], "frozen": 0}
    assert res["after"]["threshold"] == [10_000, 10, 10]
    assert res["after"]["frozen"] > 10_000  # the modules and objects gunicorn.conf.py loaded
    assert res["worker_connections"] == 32  # threads x 4


def _get_health(sock: socket.socket) -> bytes:
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: omni\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, "connection closed before the answer"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(4096)
    return head.split(b"\r\n")[0]


def _held_per_worker(svc) -> dict[int, int]:
    held = {}
    for pid in svc.worker_pids():
        conns = psutil.Process(pid).net_connections(kind="tcp")
        held[pid] = sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == svc.port)
    return held


def test_a_burst_of_connections_is_spread_over_the_workers(make_service):
    """A client opening its whole keep-alive pool at once (as wrk, or a proxy, does) must not
    land every connection on one worker: with THREADS=4 a worker holds at most 16, so 32
    connections opened together are split 16/16, and every one is then served."""
    svc = make_service({"AUTOMAGIK_OMNI_THREADS": "4"}, workers=2)
    socks = [socket.create_connection(("127.0.0.1", svc.port), timeout=10) for _ in range(32)]
    try:
        # Nothing sent yet: each connection is held by the worker that accepted it.
        deadline = time.monotonic() + 5
        while sum(_held_per_worker(svc).values()) < 32 and time.monotonic() < deadline:
            time.sleep(0.1)
        held = _held_per_worker(svc)
        assert sorted(held.values()) == [16, 16], held
        for s in socks:
            assert _get_health(s) == b"HTTP/1.1 200 OK"
    finally:
        for s in socks:
            s.close()
