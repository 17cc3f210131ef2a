"""Prometheus metrics of the node (``prometheus_client``), served at ``/metrics`` by the API.

These metric objects are module-level: the one accepted exception to "no
module-level state" (style rule 5). A Prometheus counter is a process-wide fact
(scrapes must see every increment, from whichever thread or node object made
it), ``prometheus_client`` registers collectors in its process-wide default
registry, and the emitting modules (C-STORE handler, pipeline tasks, vault,
registry) would otherwise need a metrics object threaded through every call.
Several node objects in one process (tests) therefore share these counters;
tests compare differences, never absolute values.

What is scraped from the database rather than counted here (queue depth per
queue and status, outbox items per status, studies per state) is collected at
scrape time by :mod:`dicomnode.api.metrics_collector`, so it is right for every
process that shares the database and survives restarts.

Label values are bounded sets the node chooses (status codes, stage names, queue
names, peer names, model names and versions): never a key of a study, a UID or
anything taken from a dataset.

This module is a leaf: it imports nothing from the package.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "ASSOCIATIONS",
    "CONNECTIONS_DROPPED",
    "DISK_FREE_BYTES",
    "DISK_STATE",
    "INFERENCE_SECONDS",
    "INSTANCES_RECEIVED",
    "INSTANCES_REJECTED",
    "SEND_ATTEMPTS",
    "SEND_FAILURES",
    "STAGE_SECONDS",
    "VAULT_READS",
    "add_counter_values",
    "counter_values",
    "dimse_status",
]

# From a 1 ms de-identification to a multi-minute inference on CPU.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0, 600.0)

INSTANCES_RECEIVED = Counter(
    "dicomnode_instances_received",
    "C-STORE requests answered with success (0x0000), re-sends of identical objects included.",
)
INSTANCES_REJECTED = Counter(
    "dicomnode_instances_rejected",
    "C-STORE requests answered with a failure status (see scp/handlers.py for the table).",
    ["status"],
)
ASSOCIATIONS = Counter(
    "dicomnode_associations",
    "Associations requested of the storage SCP, by outcome (accepted, rejected, aborted).",
    ["event"],
)
CONNECTIONS_DROPPED = Counter(
    "dicomnode_connections_dropped",
    "TCP connections to the storage SCP closed before they associated, by reason (closed, "
    "incomplete, timeout, tls_handshake, not_dicom, unexpected_pdu, source_limit, "
    "pending_limit); see scp/gate.py.",
    ["reason"],
)
DISK_FREE_BYTES = Gauge(
    "dicomnode_disk_free_bytes",
    "Free bytes on the data directory's filesystem (storage.min_free_gb watches it).",
)
DISK_STATE = Gauge(
    "dicomnode_disk_state",
    "The data directory's free space: 0 fine, 1 warning (below storage.warn_free_gb), "
    "2 refusing new data (below storage.min_free_gb or above storage.max_used_percent).",
)
STAGE_SECONDS = Histogram(
    "dicomnode_stage_seconds",
    "Seconds spent in one pipeline stage: deidentify (one instance), route (one study "
    "version), inference (one model on one series, volume assembly included), encode "
    "(SEG and SR of one result), reidentify and send (one outbox object).",
    ["stage"],
    buckets=_LATENCY_BUCKETS,
)
INFERENCE_SECONDS = Histogram(
    "dicomnode_inference_seconds",
    "Seconds one model version took on one series (assembly, pre/postprocessing, run).",
    ["model", "version"],
    buckets=_LATENCY_BUCKETS,
)
SEND_ATTEMPTS = Counter(
    "dicomnode_send_attempts",
    "C-STORE attempts of result objects, by destination (peer name or 'caller').",
    ["destination"],
)
SEND_FAILURES = Counter(
    "dicomnode_send_failures",
    "Failed C-STORE attempts of result objects, by destination and outcome "
    "(retry: another attempt is scheduled; dead: attempts used up or refused by the "
    "re-identification guard; unroutable: the destination has no address).",
    ["destination", "outcome"],
)
VAULT_READS = Counter(
    "dicomnode_vault_reads",
    "Audited read sessions of the identity vault, by kind of actor (reidentify, operator).",
    ["actor"],
)


def dimse_status(status: int) -> str:
    """A DIMSE status as the ``status`` label value: ``0xA700``."""
    return f"0x{status:04X}"


# Counters incremented in receiving processes (scp/pool.py): each process sends its
# values to the main process, which adds the differences to its own, so /metrics is
# the node's whichever process received.
_RELAYED = (INSTANCES_RECEIVED, INSTANCES_REJECTED, ASSOCIATIONS, CONNECTIONS_DROPPED)
_BY_NAME = {m.name: c for c in _RELAYED for m in c.collect()}

CounterValues = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def counter_values() -> CounterValues:
    """This process's values of the relayed counters, by (name, labels)."""
    out: CounterValues = {}
    for counter in _RELAYED:
        for metric in counter.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    out[(metric.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def add_counter_values(values: CounterValues) -> None:
    """Add ``values`` (differences from :func:`counter_values` of another process)."""
    for (name, labels), value in values.items():
        counter = _BY_NAME.get(name)
        if counter is None or value <= 0:
            continue
        (counter.labels(**dict(labels)) if labels else counter).inc(value)
