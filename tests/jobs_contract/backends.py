"""The queue backends under contract, built the same way in the tests and in a worker process.

Run as a script (``python backends.py KIND URL CTX``) it is a worker process that
the crash test kills with SIGKILL in the middle of :func:`hang_once`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dicomnode.jobs.base import JobQueue, RetryPolicy, TaskRegistry
from dicomnode.jobs.local import LocalQueue
from dicomnode.storage.db import create_db_engine, session_factory

KINDS = ["local-sqlite", "local-postgres", "procrastinate"]

FAST_RETRY = RetryPolicy(3, 0.05, 0.2)
POLL_S = 0.1
# a killed procrastinate worker is noticed within about STALLED_S + 1 s
HEARTBEAT_S = 0.2
STALLED_S = 1.0


def make_registry(
    tasks: Mapping[str, Callable[..., Any]],
    retry: RetryPolicy = FAST_RETRY,
    queues: Mapping[str, str] | None = None,
) -> TaskRegistry:
    """``tasks`` registered on queue ``q`` unless ``queues`` names another."""
    reg = TaskRegistry(retry)
    for name, fn in tasks.items():
        reg.register(name, fn, queue=(queues or {}).get(name, "q"))
    return reg


def make_queue(kind: str, url: str, registry: TaskRegistry, workers: Mapping[str, int],
               **options: Any) -> JobQueue:
    """A queue of backend ``kind`` on the database at ``url`` (schema already there)."""
    if kind.startswith("local"):
        sessions = session_factory(create_db_engine(url))
        return LocalQueue(sessions, registry, workers=workers, poll_interval_s=0.05, **options)
    from dicomnode.jobs.procrastinate_queue import ProcrastinateQueue

    settings: dict[str, Any] = {
        "poll_interval_s": POLL_S, "heartbeat_s": HEARTBEAT_S, "stalled_after_s": STALLED_S,
        "stalled_check_cron": "* * * * * *", **options,
    }
    return ProcrastinateQueue(url, registry, workers=workers, **settings)


def hang_once(ctx: str, n: int) -> None:
    """Record a start in directory ``ctx``; the first run hangs, later ones record the effect."""
    d = Path(ctx)
    runs = len(list(d.glob("started-*")))
    (d / f"started-{runs + 1}").touch()
    if runs == 0:
        time.sleep(600)  # killed here
    with open(d / f"effect-{n}", "a") as f:
        f.write("x")


def crash_registry() -> TaskRegistry:
    return make_registry({"hang_once": hang_once})


def main(kind: str, url: str, ctx: str) -> None:
    q = make_queue(kind, url, crash_registry(), {"q": 1})
    q.start(ctx)
    time.sleep(600)  # until SIGKILL


if __name__ == "__main__":
    main(*sys.argv[1:4])
