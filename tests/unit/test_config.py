"""Settings.from_env (SPEC 3): defaults, booleans, every bad value a clear startup error."""
from __future__ import annotations

import pytest

from app.config import ConfigError, Settings

KEY = "a-good-api-key-123"
P = "AUTOMAGIK_OMNI_"


def env(**values) -> dict:
    return {P + "API_KEY": KEY, **{P + k.upper(): v for k, v in values.items()}}


def test_defaults_of_spec_3():
    s = Settings.from_env({P + "API_KEY": KEY})
    assert s.api_key == KEY
    assert s.database_url == "postgresql://omni:omni@localhost:5432/omni"
    assert (s.host, s.port) == ("0.0.0.0", 8882)
    assert (s.workers, s.threads) == (2, 16)
    assert s.enable_tracing is True
    assert s.trace_retention_days == 30
    assert s.log_level == "INFO"
    assert s.enable_metrics is True
    assert s.enable_detailed_logging is True
    assert s.loki_url is None
    assert s.slow_message_seconds == 10
    assert s.store_message_content is True
    assert s.log_message_content is False


def test_other_variables_are_ignored():
    s = Settings.from_env({P + "API_KEY": KEY, "PORT": "1", "OMNI_PORT": "2", "automagik_omni_port": "3"})
    assert s.port == 8882


def test_cost_alert_budget_is_off_by_default():
    assert Settings.from_env(env()).cost_alert_usd_per_day == 0
    assert Settings.from_env(env(cost_alert_usd_per_day="")).cost_alert_usd_per_day == 0
    assert Settings.from_env(env(cost_alert_usd_per_day="12.5")).cost_alert_usd_per_day == 12.5


def test_values_are_read():
    s = Settings.from_env(env(database_url="postgresql://u:p@db:5433/x", host="127.0.0.1", port="9000",
                              workers="3", threads="4", trace_retention_days="7", log_level="debug",
                              loki_url="http://loki:3100", slow_message_seconds="2.5"))
    assert (s.database_url, s.host, s.port, s.workers, s.threads) == \
        ("postgresql://u:p@db:5433/x", "127.0.0.1", 9000, 3, 4)
    assert (s.trace_retention_days, s.log_level, s.loki_url, s.slow_message_seconds) == \
        (7, "DEBUG", "http://loki:3100", 2.5)


BOOLS = ("enable_tracing", "enable_metrics", "enable_detailed_logging", "store_message_content",
         "log_message_content")
SPELLINGS = {"true": True, "TRUE": True, "True": True, "tRuE": True, "1": True, "yes": True,
             "YES": True, "Yes": True, "false": False, "FALSE": False, "False": False, "0": False,
             "no": False, "NO": False, "No": False, " yes ": True}


@pytest.mark.parametrize("field", BOOLS)
def test_every_boolean_spelling(field):
    for raw, want in SPELLINGS.items():
        assert getattr(Settings.from_env(env(**{field: raw})), field) is want, (field, raw)


@pytest.mark.parametrize("field", BOOLS)
@pytest.mark.parametrize("raw", ["maybe", "2", "on", "off", "y", "n", "t", "truee", "-1", "\u0131"])
def test_bad_boolean_names_the_variable(field, raw):
    with pytest.raises(ConfigError) as exc:
        Settings.from_env(env(**{field: raw}))
    assert P + field.upper() in str(exc.value)


@pytest.mark.parametrize("field,raw", [
    ("port", "abc"), ("port", "80.5"), ("port", "0"), ("port", "65536"), ("port", "-1"), ("port", "99999"),
    ("workers", "x"), ("workers", "0"), ("threads", "many"), ("threads", "0"),
    ("trace_retention_days", "thirty"), ("trace_retention_days", "0"), ("trace_retention_days", "-5"),
    ("trace_retention_days", "1.5"),
    ("log_level", "VERBOSE"), ("log_level", "warn"), ("log_level", "TRACE"), ("log_level", "CRITICAL"),
    ("loki_url", "loki:3100"), ("loki_url", "ftp://loki"), ("loki_url", "not a url"), ("loki_url", "http://"),
    ("slow_message_seconds", "ten"), ("slow_message_seconds", "0"), ("slow_message_seconds", "-1"),
    ("slow_message_seconds", "nan"), ("slow_message_seconds", "inf"),
    ("database_url", "mysql://x/y"), ("database_url", "localhost:5432"),
    ("cost_alert_usd_per_day", "ten"), ("cost_alert_usd_per_day", "-1"), ("cost_alert_usd_per_day", "inf"),
])
def test_bad_values_name_the_variable(field, raw):
    with pytest.raises(ConfigError) as exc:
        Settings.from_env(env(**{field: raw}))
    assert P + field.upper() in str(exc.value), str(exc.value)


@pytest.mark.parametrize("values", [{}, {P + "API_KEY": ""}, {P + "API_KEY": "   "}, {P + "API_KEY": "short"}])
def test_missing_api_key_names_the_variable(values):
    with pytest.raises(ConfigError) as exc:
        Settings.from_env(values)
    assert P + "API_KEY" in str(exc.value)


def test_admin_commands_need_no_api_key():
    s = Settings.from_env({P + "TRACE_RETENTION_DAYS": "3"}, require_api_key=False)
    assert s.trace_retention_days == 3


def test_empty_values_mean_the_default():
    s = Settings.from_env(env(port="", enable_tracing="", loki_url=""))
    assert s.port == 8882 and s.enable_tracing is True and s.loki_url is None


def test_public_masks_secrets():
    s = Settings.from_env(env(database_url="postgresql://omni:s3cr3t-Pass@db:5432/omni",
                              metrics_token="metrics-token-xyz"))
    pub = s.public()
    text = repr(pub)
    assert KEY not in text and "s3cr3t-Pass" not in text and "metrics-token-xyz" not in text
    assert pub["api_key"] == "****"
    assert pub["database_url"] == "postgresql://omni:****@db:5432/omni"
    assert pub["port"] == 8882 and pub["enable_tracing"] is True
    # The password equal to the user name, or also in the database name: only the password goes.
    pub = Settings.from_env(env(database_url="postgresql://omni:omni@db/omni")).public()
    assert pub["database_url"] == "postgresql://omni:****@db/omni"
    # libpq also takes the password as a query parameter.
    pub = Settings.from_env(env(database_url="postgresql://omni@db/omni?password=qp-secret-1&sslmode=require")).public()
    assert "qp-secret-1" not in repr(pub) and "sslmode=require" in pub["database_url"]
    # Without a password nothing changes.
    assert Settings.from_env(env(database_url="postgresql://omni@db/omni")).public()["database_url"] == \
        "postgresql://omni@db/omni"


# ------------------------------------------------------------------ *_FILE variables
def test_a_value_can_come_from_a_file(tmp_path):
    key = tmp_path / "api_key"
    key.write_text(KEY + "\n")                      # the newline `echo` and editors add
    url = tmp_path / "database_url"
    url.write_text("postgresql://omni:s3cret@db:5432/omni")
    s = Settings.from_env({P + "API_KEY_FILE": str(key), P + "DATABASE_URL_FILE": str(url),
                           P + "PORT": "9001"})
    assert s.api_key == KEY
    assert s.database_url == "postgresql://omni:s3cret@db:5432/omni"
    assert s.port == 9001


def test_a_file_value_is_parsed_like_an_environment_value(tmp_path):
    (tmp_path / "workers").write_text("3\r\n")
    (tmp_path / "bad").write_text("many\n")
    assert Settings.from_env({**env(), P + "WORKERS_FILE": str(tmp_path / "workers")}).workers == 3
    with pytest.raises(ConfigError, match="AUTOMAGIK_OMNI_WORKERS.*whole number"):
        Settings.from_env({**env(), P + "WORKERS_FILE": str(tmp_path / "bad")})


def test_only_one_trailing_newline_is_removed(tmp_path):
    from app.config import read_variable
    f = tmp_path / "v"
    f.write_text("value\n\n")
    assert read_variable({"X_FILE": str(f)}, "X") == "value\n"
    f.write_text("value")
    assert read_variable({"X_FILE": str(f)}, "X") == "value"
    assert read_variable({"X": "plain"}, "X") == "plain"
    assert read_variable({}, "X") is None


def test_value_and_file_together_are_a_startup_error(tmp_path):
    key = tmp_path / "api_key"
    key.write_text(KEY)
    with pytest.raises(ConfigError) as exc:
        Settings.from_env({P + "API_KEY": KEY, P + "API_KEY_FILE": str(key)})
    assert "AUTOMAGIK_OMNI_API_KEY and AUTOMAGIK_OMNI_API_KEY_FILE are both set" in str(exc.value)


@pytest.mark.parametrize("path", ["/nonexistent/omni/api_key", ""])
def test_an_unreadable_file_is_a_startup_error(path):
    with pytest.raises(ConfigError, match="AUTOMAGIK_OMNI_API_KEY_FILE"):
        Settings.from_env({P + "API_KEY_FILE": path})


def test_an_empty_secret_file_counts_as_missing(tmp_path):
    empty = tmp_path / "api_key"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="AUTOMAGIK_OMNI_API_KEY is required"):
        Settings.from_env({P + "API_KEY_FILE": str(empty)})


def test_loadgen_reads_the_key_file(tmp_path, monkeypatch):
    from demo.loadgen import parse_args
    key = tmp_path / "api_key"
    key.write_text("from-a-file\n")
    monkeypatch.delenv(P + "API_KEY", raising=False)
    monkeypatch.setenv(P + "API_KEY_FILE", str(key))
    args = parse_args(["--url", "http://127.0.0.1:1", "--rate", "1", "--duration", "1"])
    assert args.api_key == "from-a-file"
