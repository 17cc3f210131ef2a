"""The operator API reads procrastinate's jobs from ``jobs.url`` when that is a database of
its own (the node's index elsewhere: here SQLite)."""

from __future__ import annotations

import sys
from pathlib import Path

from dicomnode.api import queries
from dicomnode.api.services import ApiServices
from dicomnode.app import open_database
from dicomnode.config import load_settings
from dicomnode.jobs.procrastinate_queue import ProcrastinateQueue, apply_schema

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs_contract"))
from backends import make_registry  # noqa: E402


def test_jobs_and_queues_come_from_the_queue_database(tmp_path: Path, pg_url: str) -> None:
    apply_schema(pg_url)
    settings = load_settings(None, {"data_dir": tmp_path / "data",
                                    "jobs": {"backend": "procrastinate", "url": pg_url}})
    assert settings.database_url is None  # the index is SQLite in the data directory
    queue = ProcrastinateQueue(pg_url, make_registry({"send_result": lambda ctx, **kw: None},
                                                     queues={"send_result": "send"}),
                               workers={})
    engine, sessions = open_database(settings, upgrade=True)
    try:
        ids = [queue.enqueue("send_result", {"outbox_id": i}) for i in (1, 2)]
        svc = ApiServices.over(settings, sessions)
        assert svc.queue_sessions is not None
        listed = queries.jobs(svc).items
        assert sorted(j.id for j in listed) == sorted(ids)
        assert {(j.task, j.queue, j.status) for j in listed} == {("send_result", "send", "todo")}
        assert {j.args["outbox_id"] for j in listed} == {1, 2}
        assert queries.queue_depths(svc)["send"] == {"todo": 2, "due": 2}
        # the same database for both: no second engine
        same = load_settings(None, {"data_dir": tmp_path / "data", "database_url": pg_url,
                                    "jobs": {"backend": "procrastinate"}})
        assert ApiServices.over(same, sessions).queue_sessions is None
    finally:
        queue.stop()
        engine.dispose()
