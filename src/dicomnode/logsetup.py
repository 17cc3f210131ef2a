"""Logging configuration: text or JSON lines on stderr, and the audit trail in its own file.

:func:`configure_logging` is called once by the CLI (style: the CLI is the only
place that configures logging). JSON lines carry ``ts`` (UTC, ISO 8601),
``level``, ``logger``, ``thread``, ``msg`` and any ``extra`` fields of the call.
The node's messages name pseudonymous keys only; exceptions are rendered with
their stack (file, line, code) and, for the node's own errors, their message; a
third-party exception's message is withheld because it may quote a dataset
value (the same rule as ``jobs.local.describe_error``).

Third-party loggers (pydicom, pynetdicom, uvicorn, anything not under ``dicomnode``)
and Python ``warnings`` (captured into the ``py.warnings`` logger) quote the values
they complain about: an invalid Patient's Name, an original UID, a date. Every record
of theirs passes through :func:`scrub_message` when it is created (a log record
factory, so that every handler sees the scrubbed text): quoted values, UIDs, long
digit runs, dates, person names and single-token values after a colon become
``<value>``; the message kind, the tag and the attribute keyword stay
(``Invalid value for VR DA: <value>``, ``(0010,0010) [PatientName]``).

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
import re
import sys
import traceback
from functools import lru_cache
from pathlib import Path
from typing import Any

from dicomnode.errors import NodeError

__all__ = [
    "JsonFormatter",
    "configure_logging",
    "current_logging",
    "install_third_party_filter",
    "scrub_message",
]

_AUDIT_LOGGER = "dicomnode.audit"  # dicomnode.audit.AUDIT_LOGGER; a leaf imports no sibling
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_OURS = "_dicomnode_handler"  # marks handlers installed here, so a second call replaces them

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "audit", "color_message"}  # uvicorn's ANSI copy of the message


_VALUE = "<value>"
# a quote not inside a word ("doesn't" is no quote); b'..' and "..." too
_QUOTED = re.compile(
    r"(?<![A-Za-z])b?'(?:[^'\\]|\\.)*'(?![A-Za-z])" + r'|b?"(?:[^"\\]|\\.)*"'
)
_TAG = re.compile(r"\(([0-9A-Fa-f]{4}),\s?([0-9A-Fa-f]{4})\)")
_UNSAFE = re.compile(
    r"\d+(?:\.\d+){2,}"  # UIDs, dotted dates
    r"|(?<![\w])\d{1,4}[-/]\d{1,2}[-/]\d{1,4}(?![\w])"  # dates
    r"|(?<![\w])\d{5,}(?![\w])"  # digit runs: IDs, DA, TM
    r"|[^\s'\"]*[\^@][^\s'\"]*"  # person names, e-mail addresses
)
# "...: VALUE" at the end of a message (pynetdicom's "Unknown Move Destination: X")
_TAIL = re.compile(r"(:\s+)([^\s:]+?)(\.?)$")


@lru_cache(maxsize=1)
def _safe_terms() -> frozenset[str]:
    """Words a message may quote that are no value: attribute keywords and names, VRs,
    UID names (pydicom's dictionaries), imported here lazily: this module is a leaf."""
    try:
        from pydicom.datadict import DicomDictionary
        from pydicom.uid import UID_dictionary
    except ImportError:  # pragma: no cover - pydicom is a dependency
        return frozenset()
    terms = {e[2] for e in DicomDictionary.values()} | {e[4] for e in DicomDictionary.values()}
    terms |= {e[1] for e in DicomDictionary.values()}  # VRs ("US or SS" too)
    terms |= {e[0] for e in UID_dictionary.values()}
    return frozenset(t for t in terms if t)


def _keyword(group: str, element: str) -> str:
    try:
        from pydicom.datadict import keyword_for_tag
    except ImportError:  # pragma: no cover
        return ""
    return keyword_for_tag(int(group + element, 16)) or ""


def scrub_message(text: str) -> str:
    """``text`` with the values a third-party message may quote replaced by ``<value>``.

    Keeps the kind of the message, tags (with the attribute keyword added) and quoted
    dictionary terms (keywords, attribute names, VRs, UID names); drops quoted strings,
    UIDs, dates, digit runs of five or more, ``^``/``@`` words and a single-token value
    ending the message after a colon.
    """
    safe = _safe_terms()

    def quoted(m: re.Match[str]) -> str:
        inner = m.group(0).lstrip("b")[1:-1]
        return m.group(0) if inner in safe else _VALUE

    out = _QUOTED.sub(quoted, text)
    out = _UNSAFE.sub(_VALUE, out)
    tail = _TAIL.search(out)
    if tail and tail.group(2) not in safe and tail.group(2) != _VALUE \
            and not re.fullmatch(r"\d{1,4}|[A-Z]{2}", tail.group(2)):
        out = out[: tail.start(2)] + _VALUE + tail.group(3)

    def tag(m: re.Match[str]) -> str:
        kw = _keyword(m.group(1), m.group(2))
        return f"{m.group(0)} [{kw}]" if kw else m.group(0)

    return _TAG.sub(tag, out)


def _third_party(name: str) -> bool:
    return name != "dicomnode" and not name.startswith("dicomnode.")


def _scrubbed_record(record: logging.LogRecord) -> logging.LogRecord:
    """Rewrite a third-party record in place: its message scrubbed, its args gone."""
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a broken %-format must not lose the record
        message = str(record.msg)
    record.msg = scrub_message(message)
    record.args = None
    return record


_base_factory = logging.getLogRecordFactory()


def _factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record = _base_factory(*args, **kwargs)
    if _third_party(record.name):
        _scrubbed_record(record)
    return record


def install_third_party_filter() -> None:
    """Scrub every third-party log record and capture Python warnings into logging.

    Idempotent; called by :func:`configure_logging` and by commands that log nothing of
    their own but run pydicom (the offline ``dicomnode deid``).
    """
    if logging.getLogRecordFactory() is not _factory:
        logging.setLogRecordFactory(_factory)
    logging.captureWarnings(True)


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
        foreign = _third_party(record.name)
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                value = value if isinstance(value, int | float | bool | None) else str(value)
                out[key] = scrub_message(value) if foreign and isinstance(value, str) else value
        if record.exc_info and record.exc_info[0] is not None:
            out["exc"] = _exception(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class _TextFormatter(logging.Formatter):
    """Text lines; an exception shows its stack, and its message only when it is the
    node's own (as in :class:`JsonFormatter`)."""

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        info = _exception(ei)
        lines = [info["stack"], f"{info['type']}: {info['message']}"]
        cause = info.get("cause")
        while cause:
            lines.append(f"caused by {cause['type']}: {cause['message']}")
            cause = cause.get("cause")
        return "\n".join(lines)


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
    stream.setFormatter(JsonFormatter() if json_logs else _TextFormatter(_TEXT_FORMAT))
    setattr(stream, _OURS, True)
    root.addHandler(stream)
    root.setLevel(level)
    install_third_party_filter()
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
