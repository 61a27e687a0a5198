"""Logging set-up shared by both processes, and the one-line-per-request/job records.

``LOG_FORMAT=plain`` (default): ``time LEVEL logger: message``. ``LOG_FORMAT=json``: one JSON
object per line (``time``, ``level``, ``logger``, ``message`` and, for access and job lines,
their fields at the top level) for log shippers. uvicorn is started without its own logging
config, so its lines take the same format.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

# Libraries that log request or response content at DEBUG (multipart: uploaded batch
# files; aiohttp: the worker's engine client; sse_starlette: every streamed chunk; hpack),
# or one line per request at INFO
# (httpx and httpcore, which the tests and benchmarks use as clients, and which a library
# loaded into either process may use). They stay at WARNING whatever LOG_LEVEL says:
# prompts and completions are never logged.
_QUIET = ("httpx", "httpcore", "hpack", "multipart", "aiohttp", "sse_starlette")

# The attribute of a LogRecord that carries an access or job line's fields.
FIELDS = "llmq_fields"


def clean(value: object, limit: int = 200) -> str:
    """Text from a client made safe for one log line: control characters (and anything
    non-ASCII) escaped, at most ``limit`` characters kept."""
    text = str(value)[:limit]
    return json.dumps(text, ensure_ascii=True)[1:-1]


class JsonFormatter(logging.Formatter):
    """One JSON object per record; an access or job line's fields as top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"), default=str)


def configure(level: str, fmt: str = "plain") -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)


def record_line(logger: logging.Logger, what: str, fields: dict[str, Any]) -> None:
    """An access or job line at INFO: ``what k=v k=v ...`` in plain text, the fields as
    keys in JSON. Callers pass only metadata (ids, names, numbers, statuses): never a
    prompt, a completion or a secret; strings are escaped here."""
    if not logger.isEnabledFor(logging.INFO):
        return
    safe = {k: clean(v) if isinstance(v, str) else v for k, v in fields.items()}
    text = " ".join(f"{k}={_plain(v)}" for k, v in safe.items())
    logger.info("%s %s", what, text, extra={FIELDS: safe})


def _plain(value: object) -> str:
    """A value in a plain line: ``-`` when empty, quoted when it holds a space (its quotes
    are escaped already), so ``k=v`` pairs split unambiguously."""
    if value is None or value == "":
        return "-"
    text = str(value)
    return f'"{text}"' if " " in text else text
