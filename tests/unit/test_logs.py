"""LOG_FORMAT (text|json, validated at start-up), the JSON line format, the structured
per-download line, gunicorn's error and access logs in the same format, and the
redaction of anything shaped like an Authorization value."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest
import responses
from gunicorn.config import Config
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext

from passthrough.config import ConfigError, load_settings
from passthrough.observe import logs
from tests.unit.test_telemetry import FakeRegistry, make_app

REPO_ROOT = Path(__file__).resolve().parents[2]
NO_ENV_FILE = {"ENV_FILE": "/nonexistent"}


def gunicorn_conf() -> ModuleType:
    spec = importlib.util.spec_from_file_location("conf_for_logs", REPO_ROOT / "gunicorn.conf.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("passthrough.test", logging.INFO, __file__, 1, message, args, None)
    made.__dict__.update(extra)
    return made


# -- LOG_FORMAT ------------------------------------------------------------------------------


def test_log_format_is_validated_naming_the_variable():
    assert load_settings(NO_ENV_FILE).log_format == "text"
    assert load_settings({**NO_ENV_FILE, "LOG_FORMAT": "JSON"}).log_format == "json"
    with pytest.raises(ConfigError, match="LOG_FORMAT"):
        load_settings({**NO_ENV_FILE, "LOG_FORMAT": "xml"})
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        load_settings({**NO_ENV_FILE, "OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"})
    assert load_settings({**NO_ENV_FILE, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})


def test_a_bad_log_format_stops_gunicorn_start_up(monkeypatch):
    monkeypatch.setenv("ENV_FILE", "/nonexistent")
    monkeypatch.setenv("LOG_FORMAT", "yaml")
    with pytest.raises(SystemExit, match="LOG_FORMAT"):
        gunicorn_conf().on_starting(None)
    # gunicorn's logger, made before on_starting, falls back to text meanwhile.
    assert logs.log_format_from_environment() == "text"


# -- the formats -----------------------------------------------------------------------------


def test_json_lines_carry_level_logger_message_time_and_fields():
    line = logs.JsonFormatter().format(record("hello %s", "world", image="a:b", bytes=12))
    assert "\n" not in line
    document = json.loads(line)
    assert document["message"] == "hello world"
    assert document["level"] == "INFO"
    assert document["logger"] == "passthrough.test"
    assert document["time"].endswith("Z") and "T" in document["time"]
    assert document["image"] == "a:b" and document["bytes"] == 12


def test_json_lines_carry_the_trace_and_the_exception_type():
    context = SpanContext(trace_id=0xABC, span_id=0xDEF, is_remote=False)
    with trace.use_span(NonRecordingSpan(context)):
        document = json.loads(logs.JsonFormatter().format(record("inside")))
    assert document["trace_id"] == f"{0xABC:032x}" and document["span_id"] == f"{0xDEF:016x}"
    try:
        raise KeyError("x")
    except KeyError:
        failed = logging.LogRecord("x", logging.ERROR, "f", 1, "failed", (), sys.exc_info())
    document = json.loads(logs.JsonFormatter().format(failed))
    assert document["error.type"] == "KeyError" and "Traceback" in document["traceback"]


@pytest.mark.parametrize(
    "message",
    [
        "sent Authorization: Basic YWxpY2U6aHVudGVyMg== upstream",
        "headers {'Authorization': 'Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig'}",
        "token Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig refused",
        "proxy-authorization=Basic YWxpY2U6aHVudGVyMg==",
    ],
)
def test_credentials_are_redacted_in_both_formats(message):
    for formatter in (logs.TextFormatter(), logs.JsonFormatter()):
        line = formatter.format(record(message))
        assert "YWxpY2U6aHVudGVyMg" not in line
        assert "eyJhbGciOiJIUzI1NiJ9" not in line
        assert logs.REDACTED in line


def test_redaction_leaves_ordinary_lines_alone():
    line = "download image=nginx:latest digest=sha256:abc bytes=10 outcome=completed"
    assert logs.redact(line) == line


@responses.activate
def test_the_download_line_is_structured(tmp_path, caplog):
    FakeRegistry().register(responses)
    caplog.set_level(logging.INFO, logger="passthrough")
    body = make_app(tmp_path).test_client().get("/docker/team__api_v1.tar").data
    (line,) = [r for r in caplog.records if r.getMessage().startswith("download image=")]
    document = json.loads(logs.JsonFormatter().format(line))
    assert document["logger"] == "passthrough.export.download" and document["level"] == "INFO"
    assert document["image"] == "reg.test:5000/team/api:v1"
    assert document["digest"].startswith("sha256:")
    assert document["bytes"] == len(body)
    assert isinstance(document["seconds"], float)
    assert document["outcome"] == "completed"
    assert document["client"] == "127.0.0.1"


@pytest.mark.rig  # starts a Python process: the full tier
def test_create_app_writes_json_lines_with_log_format_json(tmp_path):
    script = textwrap.dedent(
        f"""
        import logging, sys
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from passthrough import create_app
        create_app({{
            "ENV_FILE": "/nonexistent", "STORE": "off", "LOG_FORMAT": "json", "LOG_LEVEL": "DEBUG",
        }})
        logging.getLogger("passthrough.anything").debug("hello", extra={{"outcome": "x"}})
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LOG_"))}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stderr.strip().splitlines()[-1])
    assert document["message"] == "hello" and document["outcome"] == "x"
    assert document["level"] == "DEBUG"


# -- gunicorn's logs -------------------------------------------------------------------------


def test_gunicorn_conf_uses_our_logger_class():
    assert gunicorn_conf().logger_class == "passthrough.observe.logs.GunicornLogger"


def gunicorn_logger(monkeypatch: pytest.MonkeyPatch, log_format: str) -> logs.GunicornLogger:
    monkeypatch.setenv("ENV_FILE", "/nonexistent")
    monkeypatch.setenv("LOG_FORMAT", log_format)
    cfg = Config()
    cfg.set("errorlog", "-")
    cfg.set("accesslog", "-")
    return logs.GunicornLogger(cfg)


def test_gunicorn_error_and_access_logs_in_json(monkeypatch, capsys):
    logger = gunicorn_logger(monkeypatch, "json")
    logger.error("worker said Authorization: Bearer abcdef123456789")
    atoms = {"h": "10.0.0.7", "r": "GET /docker/a_b.tar HTTP/1.1", "s": "200", "B": "1024",
             "L": "0.250", "a": "ios-xe"}
    logger.access_log.info('%(h)s "%(r)s" %(s)s %(B)s %(L)ss "%(a)s"', atoms)
    captured = capsys.readouterr()
    error = json.loads(captured.err.strip().splitlines()[-1])
    assert error["logger"] == "gunicorn.error" and error["level"] == "ERROR"
    assert "abcdef123456789" not in captured.err
    access = json.loads(captured.out.strip().splitlines()[-1])
    assert access["logger"] == "gunicorn.access"
    assert access["client"] == "10.0.0.7" and access["status"] == 200 and access["bytes"] == 1024
    assert access["request"] == "GET /docker/a_b.tar HTTP/1.1" and access["seconds"] == 0.25
    assert access["user_agent"] == "ios-xe"


def test_gunicorn_text_logs_are_redacted_too(monkeypatch, capsys):
    logger = gunicorn_logger(monkeypatch, "text")
    logger.error("worker said Authorization: Basic YWxpY2U6aHVudGVyMg==")
    err = capsys.readouterr().err
    assert "worker said" in err and "YWxpY2U6aHVudGVyMg" not in err
    assert not err.strip().startswith("{")


def test_a_transfer_broken_on_purpose_is_one_line_not_a_traceback(monkeypatch, capsys):
    from passthrough.errors import TransferAborted

    logger = gunicorn_logger(monkeypatch, "text")
    try:
        raise TransferAborted("the upstream fetch failed: content does not match its digest")
    except TransferAborted:
        logger.exception("Error handling request")
    err = capsys.readouterr().err
    assert "transfer aborted (transfer_aborted): the upstream fetch failed" in err
    assert "Traceback" not in err and "[WARNING]" in err
    try:
        raise RuntimeError("a bug")
    except RuntimeError:
        logger.exception("Error handling request")
    assert "Traceback" in capsys.readouterr().err
