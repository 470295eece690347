"""The chaos soak, short (`make soak QUICK=1`): bench/soak.py against real processes.

The soak runs in its own process, as `make soak` runs it; this test checks its verdict and
reads its JSON result for the invariants, so a soak that cannot tell a failure from a pass
(every fault skipped, nothing sent) fails here too.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FAULTS = {"pg_stop", "agent_5xx", "lock_stall", "worker_sigkill", "loki_down", "agent_timeout",
          "pg_crash", "evolution_5xx", "gunicorn_restart"}


@pytest.mark.fault
@pytest.mark.timeout(400)
def test_quick_soak_loses_nothing_under_every_fault(tmp_path):
    """`python -m bench.soak --quick`: exit 0, every fault injected and seen, and every
    message accounted for: 0 lost, 0 stuck in processing, 0 double replies."""
    proc = subprocess.run([sys.executable, "-m", "bench.soak", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=390)
    results = sorted(tmp_path.glob("soak-*Z.json"))
    assert results, f"no result written (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    result = json.loads(results[-1].read_text())
    assert proc.returncode == 0, f"soak failed: {result['failed']}\n{proc.stdout}\n{proc.stderr[-2000:]}"

    inv = result["invariants"]
    assert all(v == 0 for v in inv.values()), inv
    assert result["failed"] == []
    assert result["stuck_after_drain"] == 0
    every = result["windows"][-1]
    assert every["window"] == "all" and every["sent"] == result["config"]["seconds"] * result["config"]["rate"]
    assert every["lost"] == every["stuck"] == every["double replies"] == 0
    # Accounted: each message is either final in the database or was given up with no row.
    assert every["completed"] + every["failed"] + every["error"] + every["gave up"] >= every["sent"]
    assert every["completed"] > every["sent"] // 3, every

    faults = {f["name"]: f for f in result["faults"]}
    assert set(faults) == FAULTS
    assert all(f["error"] is None and f["started"] is not None for f in faults.values()), faults
    assert all(why is None for why in result["observed"].values()), result["observed"]
    assert faults["pg_stop"]["detail"]["refused_503"] > 0
    assert faults["pg_crash"]["detail"]["refused_503"] > 0
    assert faults["lock_stall"]["detail"]["refused_503"] > 0
    assert faults["worker_sigkill"]["detail"]["victim"] not in faults["worker_sigkill"]["detail"]["workers_after"]
    assert faults["gunicorn_restart"]["detail"]["new_master"] != faults["gunicorn_restart"]["detail"]["old_master"]
    assert faults["loki_down"]["detail"]["pushes_after_up"] > 0
    assert faults["loki_down"]["detail"]["service_push_errors"] > 0
    for name in ("agent_5xx", "agent_timeout", "evolution_5xx"):
        assert faults[name]["detail"]["messages_failed"] > 0, faults[name]
    assert result["loki"]["format_errors"] == []
    assert (tmp_path / results[-1].name.replace(".json", ".md")).read_text().count("| **all** |") == 1
