"""Metrics read from the database at scrape time, and the ``/metrics`` text.

Queue depth, outbox items and studies are states of the shared database, not
events of this process: reading them per scrape makes them right whichever
process did the work and after restarts. They live in a registry of their own
per API instance (several APIs in one process, in tests, do not collide); the
event counters of :mod:`dicomnode.metrics` are in ``prometheus_client``'s default
registry. ``/metrics`` concatenates the two expositions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector
from sqlalchemy import select

from dicomnode.api.queries import queue_depths
from dicomnode.api.services import ApiServices
from dicomnode.storage import tally
from dicomnode.storage.models import ModelVersion

__all__ = ["DatabaseCollector", "exposition"]

log = logging.getLogger(__name__)


class DatabaseCollector(Collector):
    """``dicomnode_queue_jobs``, ``dicomnode_queue_due``, ``dicomnode_outbox_items``,
    ``dicomnode_studies`` and ``dicomnode_model_active`` from the node's database."""

    def __init__(self, services: ApiServices) -> None:
        self.services = services

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            depths = queue_depths(self.services)
            with self.services.sessions() as s:
                # Trigger-kept counts (storage.tally): a scrape reads a few rows, not
                # the outbox and study tables.
                outbox = [(k2, n) for (_k1, k2), n in tally.counts(s, "outbox").items()]
                studies = [(k2, n) for (_k1, k2), n in tally.counts(s, "study").items()]
                big = tally.size(s) > tally.COMPACT_ABOVE
                active = s.execute(select(ModelVersion.name, ModelVersion.version)
                                   .where(ModelVersion.status == "active")).all()
        except Exception as exc:  # a scrape must not fail because the database is down
            log.warning("metrics: database not readable (%s)", exc.__class__.__name__)
            return
        if big:
            try:
                with self.services.sessions.begin() as s:
                    tally.compact(s)
            except Exception as exc:  # the next scrape tries again
                log.warning("metrics: tally not compacted (%s)", exc.__class__.__name__)
        jobs = GaugeMetricFamily("dicomnode_queue_jobs",
                                 "Jobs in the job queue, by queue and status.",
                                 labels=["queue", "status"])
        due = GaugeMetricFamily("dicomnode_queue_depth",
                                "Jobs waiting and due now (not waiting for a retry), by queue.",
                                labels=["queue"])
        queues = set(depths) | set(self.services.settings.jobs.workers)
        for queue in sorted(queues):
            by_status = depths.get(queue, {})
            for status in ("todo", "running", "failed", "done"):
                jobs.add_metric([queue, status], by_status.get(status, 0))
            due.add_metric([queue], by_status.get("due", 0))
        yield jobs
        yield due
        items = GaugeMetricFamily("dicomnode_outbox_items",
                                  "Result objects in the outbox, by delivery status.",
                                  labels=["status"])
        counts = {str(k): int(v) for k, v in outbox}
        for status in sorted({"pending", "sent", "dead", "dropped", "unroutable"} | set(counts)):
            items.add_metric([status], counts.get(status, 0))
        yield items
        st = GaugeMetricFamily("dicomnode_studies", "Studies in the index, by state.",
                               labels=["state"])
        scounts = {str(k): int(v) for k, v in studies}
        for state in sorted({"receiving", "complete"} | set(scounts)):
            st.add_metric([state], scounts.get(state, 0))
        yield st
        models = GaugeMetricFamily("dicomnode_model_active",
                                   "1 for the active version of each model.",
                                   labels=["model", "version"])
        for name, version in active:
            models.add_metric([name, version], 1)
        yield models


def database_registry(services: ApiServices) -> CollectorRegistry:
    """A registry holding only the :class:`DatabaseCollector` of ``services``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(services))
    return registry


def exposition(database: CollectorRegistry) -> bytes:
    """The Prometheus text of this process's counters and the database gauges."""
    return generate_latest(REGISTRY) + generate_latest(database)
