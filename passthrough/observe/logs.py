"""Logging: LOG_LEVEL and LOG_FORMAT for the service's own loggers and for gunicorn's.

``LOG_FORMAT=text`` (default) writes lines for people; ``LOG_FORMAT=json`` writes one
JSON object per line for log collectors, with ``time``, ``level``, ``logger`` and
``message`` plus the structured fields a record carries (the per-download line has
``image``, ``digest``, ``bytes``, ``seconds``, ``outcome`` and ``client``), and the trace
and span ids when the line was written inside a span.

Whatever the format, a formatter here never lets an Authorization value through: the
code never logs one, and as a second line of defence anything shaped like
``Authorization: …``, ``Basic <base64>`` or ``Bearer <token>`` is replaced before the
line is written.

gunicorn.conf.py points gunicorn's ``logger_class`` at :class:`GunicornLogger`, so the
error and access logs follow the same format.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

from gunicorn.glogging import Logger as _GunicornBaseLogger

from passthrough.config import LOG_FORMATS, read_environment

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

REDACTED = "[redacted]"
_SECRET_PATTERNS = (
    # An Authorization or Proxy-Authorization header as a whole, whatever its scheme.
    re.compile(r"(?i)\b((?:proxy-)?authorization\b[\"']?\s*[:=]\s*[\"']?)[^\"'\r\n,}]+"),
    # A credential after its scheme word.
    re.compile(r"(?i)\b(basic|bearer)(\s+)[A-Za-z0-9._~+/=-]{6,}"),
)

# Attributes every LogRecord has; anything else on a record is a structured field.
_STANDARD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def redact(text: str) -> str:
    """``text`` with anything shaped like a credential replaced."""
    text = _SECRET_PATTERNS[0].sub(lambda m: m.group(1) + REDACTED, text)
    return _SECRET_PATTERNS[1].sub(lambda m: m.group(1) + m.group(2) + REDACTED, text)


def _trace_fields() -> dict[str, str]:
    """The current span's ids, for joining logs to traces (nothing when not tracing)."""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


class TextFormatter(logging.Formatter):
    """The plain format, redacted."""

    def __init__(self, fmt: str = TEXT_FORMAT, datefmt: str | None = None) -> None:
        super().__init__(fmt, datefmt)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the
    record's structured fields, the trace ids, and the exception's type and traceback."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": _iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_") and key not in document:
                document[key] = _plain(value)
        if record.name == "gunicorn.access" and isinstance(record.args, Mapping):
            document.update(_access_fields(record.args))
        for key, value in _trace_fields().items():
            document.setdefault(key, value)
        if record.exc_info and record.exc_info[0] is not None:
            document["error.type"] = record.exc_info[0].__name__
            document["traceback"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            document["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(document, ensure_ascii=False, default=str)


def _iso_time(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact(str(value))


def _access_fields(atoms: Mapping[str, Any]) -> dict[str, Any]:
    """gunicorn's access-log atoms as fields (never a header but the user agent)."""
    fields: dict[str, Any] = {}
    names = {"h": "client", "r": "request", "s": "status", "B": "bytes", "L": "seconds"}
    for atom, name in names.items():
        try:
            value = atoms[atom]
        except KeyError:
            continue
        if name in ("status", "bytes") and str(value).isdigit():
            value = int(value)
        elif name == "seconds":
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
        fields[name] = value if isinstance(value, int | float) else redact(str(value))
    try:
        fields["user_agent"] = redact(str(atoms["a"]))
    except KeyError:
        pass
    return fields


def formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else TextFormatter()


#: Loggers given a handler: ours, and the OpenTelemetry SDK's (export failures).
HANDLED_LOGGERS = ("passthrough", "opentelemetry")


def configure(level: str, log_format: str = "text") -> None:
    """The ``passthrough`` loggers at LOG_LEVEL; they and the OpenTelemetry SDK's write
    to stderr in LOG_FORMAT, unless the host application already set up logging (pytest,
    a WSGI container's root logger)."""
    logging.getLogger("passthrough").setLevel(level)
    for name in HANDLED_LOGGERS:
        logger = logging.getLogger(name)
        ours = [h for h in logger.handlers if getattr(h, "_passthrough", False)]
        for handler in ours:
            handler.setFormatter(formatter(log_format))
        if ours or logger.handlers or logging.getLogger().handlers:
            continue
        handler = logging.StreamHandler()
        handler._passthrough = True  # type: ignore[attr-defined]
        handler.setFormatter(formatter(log_format))
        logger.addHandler(handler)


def log_format_from_environment(environ: Mapping[str, str] | None = None) -> str:
    """LOG_FORMAT as gunicorn's logger needs it before the settings are validated: a bad
    value falls back to text here; on_starting then stops start-up naming it."""
    value = (read_environment(environ).get("LOG_FORMAT") or "text").strip().lower()
    return value if value in LOG_FORMATS else "text"


class GunicornLogger(_GunicornBaseLogger):  # type: ignore[misc]
    """gunicorn's logger with its error and access logs in LOG_FORMAT, redacted."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        chosen = log_format_from_environment()
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                if not getattr(handler, "_gunicorn", False):
                    continue
                if chosen == "json":
                    handler.setFormatter(JsonFormatter())
                else:
                    handler.setFormatter(_RedactingWrapper(handler.formatter))

    def exception(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        """A transfer we broke on purpose (a failed fetch, a digest that did not match:
        a :class:`PassthroughError` raised by a response body) is one warning line, not
        a traceback; anything else keeps gunicorn's full report."""
        from passthrough.errors import PassthroughError

        error = sys.exc_info()[1]
        if isinstance(error, PassthroughError):
            self.error_log.warning(
                "%s: transfer aborted (%s): %s",
                msg % args if args else msg,
                error.kind,
                " ".join(error.message.split()),
            )
            return
        super().exception(msg, *args, **kwargs)


class _RedactingWrapper(logging.Formatter):
    """gunicorn's own text format, redacted."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record))
