"""One harness per backend, each on a fresh database: LocalQueue on SQLite and on
PostgreSQL, ProcrastinateQueue on PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from backends import FAST_RETRY, KINDS, make_queue, make_registry
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.jobs.base import JobQueue, RetryPolicy, TaskRegistry
from dicomnode.jobs.local import LocalQueue
from dicomnode.storage.db import create_db_engine, migrate, session_factory


class Harness:
    """Builds queues of one backend on one database and stops them all afterwards."""

    def __init__(self, kind: str, url: str) -> None:
        self.kind = kind
        self.url = url
        self.engine: Engine = create_db_engine(url)
        if kind.startswith("local"):
            migrate(self.engine)
        else:
            from dicomnode.jobs.procrastinate_queue import apply_schema

            apply_schema(url)
        self.sessions: sessionmaker[Session] = session_factory(self.engine)
        """The caller's sessions on the queue's database (for enqueue in a transaction)."""
        self.queues: list[JobQueue] = []

    @property
    def nodes(self) -> int:
        """How many queue instances may work one database at once (LocalQueue: one owner)."""
        return 1 if self.kind.startswith("local") else 2

    def queue(
        self,
        tasks: Mapping[str, Callable[..., Any]] | TaskRegistry,
        workers: Mapping[str, int] | None = None,
        *,
        retry: RetryPolicy = FAST_RETRY,
        queues: Mapping[str, str] | None = None,
        **options: Any,
    ) -> JobQueue:
        reg = tasks if isinstance(tasks, TaskRegistry) else make_registry(tasks, retry, queues)
        q = make_queue(self.kind, self.url, reg, {"q": 2} if workers is None else workers,
                       **options)
        self.queues.append(q)
        return q

    def close(self) -> None:
        for q in self.queues:
            q.stop()
            if isinstance(q, LocalQueue):
                q.sessions.kw["bind"].dispose()
        self.engine.dispose()


@pytest.fixture(params=KINDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    if request.param == "local-sqlite":
        url = f"sqlite:///{tmp_path / 'jobs.db'}"
    else:
        url = str(request.getfixturevalue("pg_url"))
    h = Harness(request.param, url)
    try:
        yield h
    finally:
        h.close()
