"""`make smoke` (demo/smoke.py) against the parts of the stack that run here."""
import subprocess
import sys

from tests.support import ROOT


def _smoke(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "demo.smoke", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=180)


def test_smoke_passes_on_service_prometheus_and_sandbox(service, prometheus):
    # The session service runs no canary; tests/test_canary.py smoke-checks one that does.
    run = _smoke("--omni", service.url, "--api-key", service.api_key, "--sandbox", service.sandbox.url,
                 "--prometheus", prometheus.url, "--timeout", "30", "--no-canary")
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    for name in ("health", "message", "prometheus", "slo-rules"):
        assert any(line.startswith(f"ok   {name}") for line in lines), run.stdout
    assert any("loki" in line and "not checked" in line for line in lines)


def test_smoke_fails_on_a_wrong_key(service):
    run = _smoke("--omni", service.url, "--api-key", "wrong-key-123", "--sandbox", service.sandbox.url)
    assert run.returncode == 1
    assert "FAIL message" in run.stdout


def test_smoke_fails_when_nothing_answers():
    run = _smoke("--omni", "http://127.0.0.1:9")
    assert run.returncode == 1 and "FAIL health" in run.stdout
