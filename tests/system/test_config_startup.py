"""Bad configuration stops gunicorn at startup with a message naming the variable."""
from __future__ import annotations

import os
import signal
import subprocess
import tempfile

import pytest

from tests.support import PYTHON, ROOT, free_port

KEY = "a-good-api-key-123"
P = "AUTOMAGIK_OMNI_"


def run_gunicorn(overrides: dict, *, with_key: bool = True) -> tuple[int, str]:
    env_ = {k: v for k, v in os.environ.items() if not k.startswith(P)}
    env_.update({P + "HOST": "127.0.0.1", P + "PORT": str(free_port()),
                 P + "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
                 P + "WORKERS": "1",
                 "PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(prefix="omni-cfg-metrics-")})
    if with_key:
        env_[P + "API_KEY"] = KEY
    env_.update(overrides)
    proc = subprocess.Popen([os.path.join(os.path.dirname(PYTHON), "gunicorn"), "-c", "app/gunicorn.conf.py",
                             "app:create_app()"], cwd=ROOT, env=env_, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        # It started although it should not have: stop it (its own process group) and fail.
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=10)
        raise AssertionError(f"gunicorn did not refuse to start: {out[-2000:]}") from None
    return proc.returncode, out


@pytest.mark.parametrize("overrides,with_key,variable", [
    ({P + "ENABLE_TRACING": "maybe"}, True, P + "ENABLE_TRACING"),
    ({}, False, P + "API_KEY"),
    ({P + "PORT": "70000"}, True, P + "PORT"),
    ({P + "LOG_LEVEL": "LOUD"}, True, P + "LOG_LEVEL"),
])
def test_gunicorn_refuses_bad_configuration(overrides, with_key, variable):
    code, out = run_gunicorn(overrides, with_key=with_key)
    assert code != 0, out
    assert variable in out, out
    assert "Traceback" not in out, out


def test_the_service_refuses_to_start_with_both(tmp_path):
    """The check runs where the service starts (not only in Settings): a real process exits."""
    key = tmp_path / "api_key"
    key.write_text(KEY)
    child_env = {"PATH": os.environ["PATH"], P + "API_KEY": KEY, P + "API_KEY_FILE": str(key)}
    res = subprocess.run([PYTHON, "-c", "from app import create_app; create_app()"], cwd=ROOT,
                         env=child_env, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "AUTOMAGIK_OMNI_API_KEY_FILE are both set" in res.stderr
