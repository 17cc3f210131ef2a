"""Pages, /metrics, start-up and sweeps read by index at a million instances.

The database is filled the way the node writes its rows (tests/bulkfill.py) and the
real functions run against it; every statement they issue is explained (SQLite
EXPLAIN QUERY PLAN, PostgreSQL EXPLAIN) and must not read a growing table whole.
Plans, not wall times: timings are bench/scale.py's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from bulkfill import fill
from plans import check
from prometheus_client import generate_latest
from sqlalchemy import Engine, func, select

from dicomnode.api import queries
from dicomnode.api.metrics_collector import database_registry
from dicomnode.api.services import ApiServices
from dicomnode.config import RetentionSettings, load_settings
from dicomnode.storage.db import create_db_engine, migrate, session_factory
from dicomnode.storage.index import StudyIndex
from dicomnode.storage.models import Instance, Job, Study
from dicomnode.storage.retention import sweep

N_SQLITE = int(os.environ.get("DICOMNODE_SCALE_INSTANCES", "1000000"))
N_PG = int(os.environ.get("DICOMNODE_SCALE_INSTANCES_PG", "100000"))


class Filled:
    def __init__(self, engine: Engine, data_dir: Path, n: int) -> None:
        self.engine = engine
        self.sessions = session_factory(engine)
        self.index = StudyIndex(self.sessions)
        settings = load_settings(None, {"data_dir": data_dir,
                                        "database_url": str(engine.url.render_as_string(
                                            hide_password=False))})
        self.svc = ApiServices.over(settings, self.sessions)
        self.n = n


def _filled(url: str, data_dir: Path, n: int, per_study: int = 100) -> Filled:
    engine = create_db_engine(url)
    migrate(engine)
    fill(engine, n, per_study=per_study)
    return Filled(engine, data_dir, n)


@pytest.fixture(scope="module")
def sqlite_million(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Filled]:
    d = tmp_path_factory.mktemp("million")
    f = _filled(f"sqlite:///{d / 'dicomnode.db'}", d, N_SQLITE)
    yield f
    f.engine.dispose()


@pytest.fixture
def pg_filled(pg_url: str, tmp_path: Path) -> Iterator[Filled]:
    # 10-instance studies: the study, job and outbox tables as large as at a million
    # instances (the planner rightly reads small tables whole), the fill in seconds.
    f = _filled(pg_url, tmp_path, N_PG, per_study=10)
    yield f
    f.engine.dispose()


def _operations(f: Filled) -> dict[str, Callable[[], Any]]:
    now = time.time()
    return {
        "api studies page": lambda: queries.studies(f.svc, limit=50),
        "api studies page, complete": lambda: queries.studies(f.svc, state="complete",
                                                              limit=50),
        "api studies since a day": lambda: queries.studies(f.svc, limit=50,
                                                           since=now - 86400),
        "cli studies page": lambda: f.index.studies(limit=100),
        "metrics": lambda: generate_latest(database_registry(f.svc)),
        "jobs page, done": lambda: queries.jobs(f.svc, status="done", limit=50),
        "start-up: spool lookups": lambda: f.index.indexed_spool_paths(
            ["spool/9/99.dcm", "spool/x/y.dcm"]),
        "start-up: unhooked studies": f.index.unhooked,
        "start-up and sweep: pending de-identification": f.index.pending_deid,
        "spool expiry": lambda: f.index.expired_spool_files(now, now),
        # last: it removes the oldest day's studies (and reads every protection check)
        "retention sweep": lambda: sweep(f.engine, f.sessions, f.svc.files, RetentionSettings(
            studies_days=364, jobs_days=364.5, outbox_days=364.5, batch=10), now=now),
    }


def _assert_flat(f: Filled) -> dict[str, Any]:
    values: dict[str, Any] = {}
    failures = []
    for name, run in _operations(f).items():
        values[name], bad = check(f.engine, run)
        failures += [f"{name}: {line}\n    {stmt[:300]}" for stmt, lines in bad for line in lines]
    assert not failures, "whole-table reads:\n" + "\n".join(failures)
    return values


@pytest.mark.slow
def test_sqlite_million_instances_read_by_index(sqlite_million: Filled) -> None:
    f = sqlite_million
    with f.sessions() as s:
        assert s.execute(select(func.count()).select_from(Instance)).scalar() == f.n
    values = _assert_flat(f)
    page = values["api studies page"]
    # The page is right, not only cheap: newest first, counts from the index.
    assert page.total == f.n // 100
    assert len(page.items) == 50
    assert [i.id for i in page.items] == list(range(f.n // 100, f.n // 100 - 50, -1))
    assert all(i.instances == 100 and i.series == 2 for i in page.items)
    assert values["api studies since a day"].items  # fill spreads a year: the newest day
    assert len(values["cli studies page"]) == 100
    text = values["metrics"].decode()
    n = f.n // 100
    assert f'dicomnode_studies{{state="complete"}} {n}.0' in text
    assert f'dicomnode_outbox_items{{status="sent"}} {n}.0' in text
    assert f'dicomnode_queue_jobs{{queue="deid",status="done"}} {n}.0' in text
    assert values["start-up: spool lookups"] == set()  # only the newest studies keep spool
    assert values["start-up: unhooked studies"] == []
    swept = values["retention sweep"]
    assert swept.studies >= 1 and swept.jobs >= 1 and swept.outbox >= 1


def test_postgresql_reads_by_index(pg_filled: Filled) -> None:
    values = _assert_flat(pg_filled)
    assert values["api studies page"].total == pg_filled.n // 10
    assert values["retention sweep"].studies >= 1


def test_tally_counts_follow_every_change(db_url: str, tmp_path: Path) -> None:
    """The trigger-kept counts equal the table counts through inserts, status changes,
    deletes and compaction, on both databases."""
    from dicomnode.storage import tally

    engine = create_db_engine(db_url)
    try:
        migrate(engine)
        fill(engine, 1000, per_study=100)
        sessions = session_factory(engine)

        def truth() -> dict[tuple[str, str], int]:
            with sessions() as s:
                return {(q, st): int(n) for q, st, n in s.execute(
                    select(Job.queue, Job.status, func.count()).group_by(Job.queue, Job.status))}

        def kept() -> dict[tuple[str, str], int]:
            with sessions() as s:
                return tally.counts(s, "job")

        assert kept() == truth()
        with sessions.begin() as s:
            s.execute(Job.__table__.update().where(Job.id <= 3).values(status="todo"))
            s.execute(Job.__table__.update().where(Job.id == 4).values(queue="other"))
            s.execute(Job.__table__.delete().where(Job.id.in_([5, 6])))
            s.execute(Job.__table__.update().where(Job.id == 7).values(attempts=3))
        assert kept() == truth()
        with sessions.begin() as s:
            removed = tally.compact(s)
        assert removed > len(truth())
        assert kept() == truth()
        expected = truth()
        with sessions() as s:
            assert tally.size(s) == len(expected) + 2  # and one row each: outbox, study
            studies = tally.counts(s, "study")
            n_studies = s.execute(select(func.count()).select_from(Study)).scalar()
        assert studies == {("", "complete"): n_studies}
    finally:
        engine.dispose()
