"""Capture the SQL a function runs and check its query plans for whole-table reads."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, event

BIG = ("instance", "study", "series", "job", "outbox", "inference_result", "vault_identity",
       "vault_uid")
"""Tables that grow with the studies received (labels grow with annotators' work: few)."""

PARTIAL = ("ix_instance_deid_due", "ix_instance_spool", "ix_study_unhooked")
"""Partial indexes: a scan of one reads only the rows of its condition (few)."""


@contextmanager
def captured(engine: Engine) -> Iterator[list[tuple[str, Any]]]:
    """Collect (statement, parameters) of every SELECT/DELETE/UPDATE run on ``engine``."""
    out: list[tuple[str, Any]] = []

    def grab(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
             executemany: bool) -> None:
        head = statement.lstrip().split(None, 1)[0].upper()
        if head in ("SELECT", "DELETE", "UPDATE", "WITH") and not executemany:
            out.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", grab)
    try:
        yield out
    finally:
        event.remove(engine, "before_cursor_execute", grab)


def plan(engine: Engine, statement: str, parameters: Any) -> list[str]:
    """The plan lines of one statement (SQLite EXPLAIN QUERY PLAN, PostgreSQL EXPLAIN),
    run in a transaction that is rolled back (a DELETE's plan is read, never run)."""
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        if engine.dialect.name == "sqlite":
            cur.execute("EXPLAIN QUERY PLAN " + statement, parameters)
            return [str(r[3]) for r in cur.fetchall()]
        cur.execute("EXPLAIN " + statement, parameters)
        return [str(r[0]) for r in cur.fetchall()]
    finally:
        raw.rollback()
        raw.close()


_ALIAS = re.compile(r"\b(?:FROM|JOIN)\s+(\w+)(?:\s+(?:AS\s+)?(\w+))?", re.I)


def whole_table_reads(engine: Engine, statement: str, lines: list[str]) -> list[str]:
    """Plan lines that read a growing table whole (or a whole non-partial index of it).

    An ordered index scan under a LIMIT stops after the page, so it is allowed. SQLite
    names a table by its alias in the plan: aliases are resolved from the statement.
    """
    limited = re.search(r"\bLIMIT\b", statement, re.I) is not None
    alias = {a: t for t, a in _ALIAS.findall(statement) if a}
    bad = []
    for line in lines:
        if engine.dialect.name == "sqlite":
            m = re.match(r"\s*SCAN (\w+)(?: AS \w+)?(.*)", line)
            if not m or alias.get(m.group(1), m.group(1)) not in BIG:
                continue
            rest = m.group(2)
            if any(p in rest for p in PARTIAL):
                continue
            if limited and "INDEX" in rest and "COVERING" not in rest:
                continue
            bad.append(line)
        else:
            m = re.search(r"(Seq Scan|Index Only Scan|Index Scan|Bitmap Heap Scan)"
                          r"(?: Backward)?(?: using (\w+))? on (\w+)", line)
            if not m or m.group(3) not in BIG:
                continue
            if m.group(1) == "Seq Scan":
                bad.append(line)
    return bad


def check(engine: Engine, run: Callable[[], Any]) -> tuple[Any, list[tuple[str, list[str]]]]:
    """Run ``run()``; return its value and (statement, bad plan lines) for each statement
    that reads a growing table whole."""
    with captured(engine) as stmts:
        value = run()
    bad = []
    for statement, params in stmts:
        lines = plan(engine, statement, params)
        found = whole_table_reads(engine, statement, lines)
        if found:
            bad.append((statement, found))
    return value, bad
