"""`make run`: the whole main job without Docker, stopped by Ctrl-C.

Starts a throwaway PostgreSQL (unless AUTOMAGIK_OMNI_DATABASE_URL is set), applies the
migrations, then the sandbox, the service under gunicorn, demo traffic and, when installed,
Prometheus with the project's config and rules. Everything it started stops on exit.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from demo.processes import PgCluster, stop_process, wait_http

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _start(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    out = open(log, "a")
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _prometheus_config(run_dir: Path, omni_port: int, prom_port: int) -> Path:
    text = (ROOT / "prometheus" / "prometheus.native.yml").read_text()
    text = text.replace("127.0.0.1:8882", f"127.0.0.1:{omni_port}")
    text = text.replace("127.0.0.1:9090", f"127.0.0.1:{prom_port}")
    text = text.replace("- rules/*.yml", f"- {ROOT / 'prometheus' / 'rules'}/*.yml")
    path = run_dir / "prometheus.yml"
    path.write_text(text)
    return path


def _ensure_instance(omni_url: str, api_key: str, name: str, sandbox_url: str) -> None:
    """Create an instance against the sandbox unless it exists."""
    body = {"name": name, "agent_api_url": sandbox_url, "evolution_url": sandbox_url,
            "agent_timeout_s": 30}
    req = urllib.request.Request(omni_url + "/api/v1/instances", data=json.dumps(body).encode(),
                                 method="POST", headers={"x-api-key": api_key,
                                                         "Content-Type": "application/json"})
    try:
        urllib.request.urlopen(req, timeout=10).close()
    except urllib.error.HTTPError as exc:
        if exc.code != 409:  # 409: it exists (a database kept from an earlier run)
            raise


def main(argv: list[str] | None = None) -> int:
    """Start everything, print where it is, wait for Ctrl-C, stop everything."""
    parser = argparse.ArgumentParser(prog="python -m demo.native", description=__doc__)
    parser.add_argument("--port", type=int, default=int(os.environ.get("AUTOMAGIK_OMNI_PORT", 8882)))
    parser.add_argument("--sandbox-port", type=int, default=int(os.environ.get("SANDBOX_PORT", 8890)))
    parser.add_argument("--prometheus-port", type=int, default=9090)
    parser.add_argument("--rate", type=float, default=2.0, help="demo messages per second (0: none)")
    parser.add_argument("--duration", type=float, default=0, help="stop after this many seconds (0: Ctrl-C)")
    parser.add_argument("--latency-median-ms", default=os.environ.get("SANDBOX_LATENCY_MEDIAN_MS", "4000"))
    args = parser.parse_args(argv)

    run_dir = Path(tempfile.mkdtemp(prefix="omni-run-"))
    procs: list[subprocess.Popen] = []
    cluster: PgCluster | None = None
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        db_url = os.environ.get("AUTOMAGIK_OMNI_DATABASE_URL")
        if not db_url:
            print("starting a throwaway PostgreSQL ...", flush=True)
            cluster = PgCluster(fsync=True)
            db_url = cluster.create_database("omni")
        api_key = os.environ.get("AUTOMAGIK_OMNI_API_KEY") or secrets.token_urlsafe(24)
        # The canary messages the `canary` instance (created below against the sandbox) every
        # 30 s, as in the compose demo; AUTOMAGIK_OMNI_CANARY_INSTANCE= (empty) turns it off.
        canary = os.environ.get("AUTOMAGIK_OMNI_CANARY_INSTANCE", "canary")
        env = {"AUTOMAGIK_OMNI_CANARY_INTERVAL_S": "30", **os.environ,
               "AUTOMAGIK_OMNI_DATABASE_URL": db_url, "AUTOMAGIK_OMNI_API_KEY": api_key,
               "AUTOMAGIK_OMNI_HOST": "127.0.0.1", "AUTOMAGIK_OMNI_PORT": str(args.port),
               "AUTOMAGIK_OMNI_CANARY_INSTANCE": canary}
        subprocess.run([sys.executable, "-m", "app", "migrate"], cwd=ROOT, env=env, check=True)
        sandbox_url = f"http://127.0.0.1:{args.sandbox_port}"
        box_env = {**env, "SANDBOX_HOST": "127.0.0.1", "SANDBOX_PORT": str(args.sandbox_port),
                   "SANDBOX_LATENCY_MEDIAN_MS": args.latency_median_ms,
                   "SANDBOX_SLOW_RATE": os.environ.get("SANDBOX_SLOW_RATE", "0.02"),
                   "SANDBOX_FAIL_RATE": os.environ.get("SANDBOX_FAIL_RATE", "0.03"),
                   # Delivery and read receipts back to the gateway, as Evolution sends them.
                   "SANDBOX_WEBHOOK_URL": os.environ.get(
                       "SANDBOX_WEBHOOK_URL", f"http://127.0.0.1:{args.port}/webhook/evolution")}
        procs.append(_start([sys.executable, "-m", "demo.sandbox"], box_env, run_dir / "sandbox.log"))
        wait_http(sandbox_url + "/health", proc=procs[-1])
        procs.append(_start([str(BIN / "gunicorn"), "-c", "app/gunicorn.conf.py", "app:create_app()"],
                            env, run_dir / "omni.log"))
        omni_url = f"http://127.0.0.1:{args.port}"
        wait_http(omni_url + "/health", proc=procs[-1], timeout=60)
        if canary:
            _ensure_instance(omni_url, api_key, canary, sandbox_url)
        prom_url = None
        if shutil.which("prometheus"):
            cfg = _prometheus_config(run_dir, args.port, args.prometheus_port)
            procs.append(_start(["prometheus", f"--config.file={cfg}",
                                 f"--storage.tsdb.path={run_dir / 'prometheus'}",
                                 f"--web.listen-address=127.0.0.1:{args.prometheus_port}"],
                                env, run_dir / "prometheus.log"))
            prom_url = f"http://127.0.0.1:{args.prometheus_port}"
        if args.rate > 0:
            procs.append(_start([sys.executable, "-m", "demo.loadgen", "--url", omni_url,
                                 "--rate", str(args.rate), "--duration", "0", "--api-key", api_key,
                                 "--sandbox-url", sandbox_url], env, run_dir / "loadgen.log"))
        print(f"""
omni is running (Ctrl-C stops everything started here)
  service     {omni_url}   (health: {omni_url}/health, metrics: {omni_url}/metrics)
  API key     {api_key}
  traces      curl -H 'x-api-key: {api_key}' {omni_url}/api/v1/traces
  sandbox     {sandbox_url}   (replies sent: {sandbox_url}/sent)
  canary      {f"instance {canary!r} every {env['AUTOMAGIK_OMNI_CANARY_INTERVAL_S']} s" if canary else 'off'}
  prometheus  {prom_url or 'not installed (apt-get install prometheus)'}
  database    {db_url}
  logs        {run_dir}/*.log
""", flush=True)
        deadline = time.monotonic() + args.duration if args.duration else None
        while not stop["now"] and (deadline is None or time.monotonic() < deadline):
            for proc in procs:
                if proc.poll() is not None:
                    print(f"a process exited ({proc.args[:3]}), see {run_dir}", file=sys.stderr)
                    return 1
            time.sleep(0.5)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        print("stopping ...", flush=True)
        for proc in reversed(procs):
            stop_process(proc, timeout=40)
        if cluster is not None:
            cluster.destroy()


if __name__ == "__main__":
    sys.exit(main())
