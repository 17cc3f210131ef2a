"""Logging configuration: text or JSON lines on stderr, and the audit trail in its own file.

:func:`configure_logging` is called once by the CLI (style: the CLI is the only
place that configures logging). JSON lines carry ``ts`` (UTC, ISO 8601),
``level``, ``logger``, ``thread``, ``msg`` and any ``extra`` fields of the call.
The node's messages name pseudonymous keys only; exceptions are rendered with
their stack (file, line, code) and, for the node's own errors, their message; a
third-party exception's message is withheld because it may quote a dataset
value (the same rule as ``jobs.local.describe_error``).

The audit logger (``dicomnode.audit``, see :mod:`dicomnode.audit`) goes to
``audit_path`` only, one JSON object per line, when a path is given (file mode
0600, reopened when rotated away: ``WatchedFileHandler``); without one, audit
lines go to stderr with the rest.

This module is a leaf: it imports only :mod:`dicomnode.errors` from the package.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import logging.handlers
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from dicomnode.errors import NodeError

__all__ = ["JsonFormatter", "configure_logging", "current_logging"]

_AUDIT_LOGGER = "dicomnode.audit"  # dicomnode.audit.AUDIT_LOGGER; a leaf imports no sibling
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_OURS = "_dicomnode_handler"  # marks handlers installed here, so a second call replaces them

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "audit", "color_message"}  # uvicorn's ANSI copy of the message


def _exception(exc_info: Any) -> dict[str, Any]:
    etype, exc, tb = exc_info
    shown = (str(exc) if isinstance(exc, NodeError)
             else "(message withheld: may quote patient data)")
    out: dict[str, Any] = {"type": getattr(etype, "__name__", str(etype)), "message": shown,
                           "stack": "".join(traceback.format_tb(tb)).rstrip()}
    cause = getattr(exc, "__cause__", None)
    if cause is not None:
        out["cause"] = _exception((type(cause), cause, cause.__traceback__))
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring for the fields)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.UTC)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "thread": record.threadName,
        }
        audit = getattr(record, "audit", None)
        if isinstance(audit, dict):
            out["audit"] = audit
        else:
            out["msg"] = record.getMessage()
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, str | int | float | bool | None) \
                    else str(value)
        if record.exc_info and record.exc_info[0] is not None:
            out["exc"] = _exception(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class _AuditLineFormatter(logging.Formatter):
    """The audit file: the message alone (already one JSON object)."""

    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage()


def _open_audit_file(path: Path) -> logging.Handler:
    # 0700 like data_dir itself, which the CLI may create here before create_node does
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Create with 0600 before the handler opens it: the trail names pseudonyms and peers.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.close(fd)
    handler = logging.handlers.WatchedFileHandler(path, encoding="utf-8")
    handler.setFormatter(_AuditLineFormatter())
    return handler


def configure_logging(level: str, *, json_logs: bool, audit_path: Path | None) -> None:
    """Configure the root logger, the audit logger and noisy third-party loggers.

    Calling it again replaces what an earlier call installed (handlers of others stay).

    Parameters
    ----------
    level
        ``DEBUG``, ``INFO``, ``WARNING`` or ``ERROR``.
    json_logs
        JSON lines on stderr instead of text.
    audit_path
        Append audit lines to this file (created 0600) instead of stderr.

    Raises
    ------
    OSError
        The audit file cannot be created or opened (the CLI reports it; a node
        that cannot audit must not start).
    """
    root = logging.getLogger()
    audit_log = logging.getLogger(_AUDIT_LOGGER)
    for lg in (root, audit_log):
        for h in [h for h in lg.handlers if getattr(h, _OURS, False)]:
            lg.removeHandler(h)
            h.close()
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(JsonFormatter() if json_logs else logging.Formatter(_TEXT_FORMAT))
    setattr(stream, _OURS, True)
    root.addHandler(stream)
    root.setLevel(level)
    # pynetdicom's INFO is one line per DIMSE message; keep it at WARNING.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # uvicorn's access log is one line per request (pseudonymous paths); keep errors only.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    audit_log.setLevel(logging.INFO)
    if audit_path is not None:
        handler = _open_audit_file(audit_path)
        setattr(handler, _OURS, True)
        audit_log.addHandler(handler)
        audit_log.propagate = False
    else:
        audit_log.propagate = True


def current_logging() -> tuple[bool, Path | None] | None:
    """What :func:`configure_logging` installed in this process, as (json_logs,
    audit_path), or None when it was not called: a receiving process (scp/pool.py)
    logs the same way as the process that started it."""
    ours = [h for h in logging.getLogger().handlers if getattr(h, _OURS, False)]
    if not ours:
        return None
    json_logs = isinstance(ours[0].formatter, JsonFormatter)
    audit = [h for h in logging.getLogger(_AUDIT_LOGGER).handlers
             if getattr(h, _OURS, False) and isinstance(h, logging.FileHandler)]
    return json_logs, (Path(audit[0].baseFilename) if audit else None)
