"""The composition root: :func:`create_node` builds a :class:`Node` from settings.

Only this module (and the CLI) sees every part. It owns the engine, the file
store, the job queue, the SCP and the completion loop; parts receive what they
need as arguments, never through globals. Wiring is fixed once ``start`` runs.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pynetdicom import _config as pynetdicom_config
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.audit import audit
from dicomnode.config import DeidSettings, NodeSettings
from dicomnode.dicom.deid import (
    Deidentifier,
    DeidOptions,
    MaskRule,
    PatientNameStyle,
    PrivateTagRule,
    Region,
)
from dicomnode.dicom.pseudonym import Pseudonymizer
from dicomnode.errors import ConfigError, NodeError, StorageError
from dicomnode.inference import ModelSessions, RuntimeOptions
from dicomnode.inference.golden import golden_validator
from dicomnode.inference.package import demo_model_paths
from dicomnode.inference.worker import IsolatedSessions
from dicomnode.jobs.base import JobQueue, RetryPolicy, TaskRegistry
from dicomnode.jobs.local import LocalQueue
from dicomnode.pipeline.deid import deidentify_pending, sweep_deid
from dicomnode.pipeline.infer import route_study
from dicomnode.pipeline.learning import drift_on_result
from dicomnode.pipeline.tasks import (
    CompletionHook,
    TaskContext,
    enqueue_encoding,
    enqueue_label,
    register_tasks,
)
from dicomnode.scp.pool import ReceiverPool
from dicomnode.scp.server import StorageServer
from dicomnode.scp.slots import AssociationSlots
from dicomnode.scp.transport import Listener
from dicomnode.storage import retention, tally
from dicomnode.storage.db import create_db_engine, migrate, schema_state, session_factory
from dicomnode.storage.diskguard import DiskGuard
from dicomnode.storage.index import StudyIndex
from dicomnode.storage.ingest import Ingestor
from dicomnode.storage.keys import load_secret, vault_key
from dicomnode.storage.labels import LabelStore
from dicomnode.storage.outbox import Outbox
from dicomnode.storage.registry import ModelRegistry
from dicomnode.storage.results import ResultStore
from dicomnode.storage.retention import RetentionReport
from dicomnode.storage.spool import FileStore
from dicomnode.storage.vault import Vault

__all__ = ["Node", "create_node", "open_database"]

log = logging.getLogger(__name__)

# pynetdicom logs C-FIND/MOVE/GET identifiers (patient data) unless told not to.
pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False


def runtime_options(settings: NodeSettings) -> RuntimeOptions:
    """ONNX Runtime options from ``[inference]``."""
    inf = settings.inference
    providers = inf.providers if isinstance(inf.providers, str) else tuple(inf.providers)
    return RuntimeOptions(providers=providers, intra_op_threads=inf.intra_op_threads,
                          inter_op_threads=inf.inter_op_threads,
                          engine_cache_dir=str(settings.data_dir.resolve() / "trt-cache"),
                          tensorrt_fp16=inf.tensorrt_fp16)


def model_registry(settings: NodeSettings, sessions: sessionmaker[Session]) -> ModelRegistry:
    """The registry, with golden cases run when a package is added or activated."""
    return ModelRegistry(sessions, settings.data_dir.resolve(),
                         validator=golden_validator(runtime_options(settings),
                                                    settings.inference.memory_budget_mb))


def disk_guard(settings: NodeSettings) -> DiskGuard:
    """The disk watermark of this process over the data directory (``[storage]``)."""
    return DiskGuard(settings.data_dir.resolve(), settings.storage, who=settings.ae_title)


def open_database(settings: NodeSettings, *, upgrade: bool) -> tuple[Engine, sessionmaker[Session]]:
    """Engine and sessions for the configured database.

    With ``upgrade``, an empty database gets the schema (the embedded first start);
    a database behind the code's schema is refused either way: run ``dicomnode db
    upgrade`` (an operator decision when several nodes share it).

    Raises
    ------
    StorageError
        Database unreachable, or its schema is not the code's.
    """
    engine = create_db_engine(settings.effective_database_url)
    try:
        current, head = schema_state(engine)
    except Exception as exc:
        raise StorageError(f"cannot open the database: {exc.__class__.__name__}: {exc}") from exc
    if current is None and upgrade:
        log.info("empty database: creating the schema (revision %s)", head)
        migrate(engine)
    elif current != head:
        raise StorageError(
            f"database schema is at {current or 'nothing'}, this version needs {head}: "
            "run `dicomnode db upgrade`"
        )
    return engine, session_factory(engine)


@dataclass
class Node:
    """One running node: storage, queue, SCP and the completion loop."""

    settings: NodeSettings
    engine: Engine
    sessions: sessionmaker[Session]
    files: FileStore
    index: StudyIndex
    queue: JobQueue
    ctx: TaskContext
    server: StorageServer | ReceiverPool | None
    ingestor: Ingestor | None = None
    scheduler: Any = None
    api: Any = None
    disk: DiskGuard = field(init=False)
    """The disk watermark: STOW-RS and the completion loop's periodic look."""
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    started: bool = False

    def __post_init__(self) -> None:
        self.disk = disk_guard(self.settings)

    def add_completion_hook(self, hook: CompletionHook) -> None:
        """Run ``hook(ctx, study_id, version)`` when a study version settles."""
        if self.started:
            raise RuntimeError("wiring is fixed once the node has started")
        self.ctx.completion_hooks.append(hook)

    def start(self) -> None:
        """Recover from a crash, then start the queue, the completion loop and the SCP."""
        if self.settings.inference.demo_model:
            ensure_demo_model(self.ctx.registry)
        removed = self.files.clean_tmp()
        if removed:
            log.info("removed %d partial write(s) left by an earlier run", removed)
        if self.ingestor is not None:
            reindexed = self._reconcile_spool(self.ingestor)
            if reindexed:
                log.info("indexed %d spool file(s) whose index rows an earlier run lost", reindexed)
        self.queue.start(self.ctx)
        # Instances left identified by an earlier run: their deadlines are in the index.
        sweep_deid(self.ctx)
        for study_id, version in self.index.unhooked():
            self._enqueue_completion(None, study_id, version)
        t = threading.Thread(target=self._completion_loop, name="completion", daemon=True)
        t.start()
        self._threads.append(t)
        if self.settings.retention.enabled:
            t = threading.Thread(target=self._retention_loop, name="retention", daemon=True)
            t.start()
            self._threads.append(t)
        if self.settings.learning.enabled and isinstance(self.queue, LocalQueue):
            # embedded: APScheduler in this process; scale-out: procrastinate's periodic
            # task, registered in create_node, fires once per tick across the cluster
            self.scheduler = start_scheduler(self)
        if self.server is not None and self.settings.api.enabled:
            # Before the SCP: a port clash stops the node before it takes associations.
            from dicomnode.api import ApiServer, ApiServices, create_api  # only when serving

            # STOW-RS refuses at the same watermark as the SCP (503 with Retry-After).
            services = ApiServices.from_context(self.ctx, self.sessions, self.ingestor,
                                                self.disk.retry_after)
            app = create_api(services, self.settings.api)
            self.api = ApiServer(app, self.settings.api.host, self.settings.api.port)
            self.api.start()
        if self.server is not None:
            self.server.start()
        self.started = True
        audit("application_start", user=self.settings.ae_title, ae_title=self.settings.ae_title)

    def stop(self) -> None:
        """Stop taking associations, let running ones finish, then stop the workers."""
        if self.api is not None:
            self.api.stop()  # no operator action lands while the node winds down
        if self.server is not None:
            self.server.stop()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
            _RUNNING.pop(str(self.files.root), None)
        self._stop.set()
        for t in self._threads:
            t.join(5)
        self.queue.stop()
        if self.ctx.models is not None and hasattr(self.ctx.models, "close"):
            self.ctx.models.close()  # the inference worker process
        self.engine.dispose()
        self.files.close()
        audit("application_stop", user=self.settings.ae_title, ae_title=self.settings.ae_title)

    def _reconcile_spool(self, ingestor: Ingestor) -> int:
        # A spool file without an index row was fsynced but its row never committed
        # (crash, or a power cut losing SQLite's last NORMAL-mode transactions): index it.
        # The files drive the lookups (a batch at a time, by index): an empty spool costs
        # no query at all, a full one costs its own size, never the archive's.
        spool = self.files.root / "spool"
        if not spool.is_dir():
            return 0
        n = 0
        batch: list[str] = []

        def flush() -> int:
            known = self.index.indexed_spool_paths(batch)
            done = 0
            for rel in batch:
                if rel in known:
                    continue
                try:
                    done += ingestor.reindex(rel)
                except NodeError as exc:
                    log.error("spool file %s cannot be indexed (%s); left in place", rel, exc)
            batch.clear()
            return done

        for p in spool.rglob("*.dcm"):
            batch.append(p.relative_to(self.files.root).as_posix())
            if len(batch) >= 500:
                n += flush()
        if batch:
            n += flush()
        return n

    def _enqueue_completion(self, session: Session | None, study_id: int, version: int) -> None:
        self.queue.enqueue(
            "study_complete",
            {"study_id": study_id, "version": version},
            dedup_key=f"study_complete:{study_id}:{version}",
            session=session,
        )

    def check_completion(self) -> list[tuple[int, int, str]]:
        """Complete every due study now (the loop calls this every check interval)."""
        done = self.index.complete_due(self.settings.completion.rules, self._enqueue_completion)
        for study_id, version, reason in done:
            log.info("study %d version %d settled (%s)", study_id, version, reason)
        return done

    def expire_spool(self) -> int:
        """Delete identified spool files kept past ``deid.spool_retention_s`` (or, for
        objects that could not be de-identified, ``deid.failed_spool_retention_s``)."""
        now = time.time()
        cutoff = now - self.settings.deid.spool_retention_s
        failed_cutoff = now - self.settings.deid.failed_spool_retention_s
        n = 0
        for instance_id, path in self.index.expired_spool_files(cutoff, failed_cutoff):
            self.files.delete(path)
            self.index.forget_spool(instance_id, path)
            n += 1
        if n:
            audit("spool_expired", user=self.settings.ae_title, count=n)
        return n

    def compact_tally(self) -> None:
        """Fold the trigger-kept counts once they pass ``tally.COMPACT_ABOVE`` rows, so
        that /metrics and the studies total read a small table with or without scrapes."""
        with self.sessions() as s:
            big = tally.size(s) > tally.COMPACT_ABOVE
        if big:
            with self.sessions.begin() as s:
                tally.compact(s)

    def retention_sweep(self) -> RetentionReport:
        """Remove what ``[retention]`` says has expired (storage/retention.py)."""
        return retention.sweep(
            self.engine, self.sessions, self.files, self.settings.retention,
            who=self.settings.ae_title,
            audit_path=self.settings.audit_file or self.settings.data_dir.resolve() / "audit.jsonl")

    def _retention_loop(self) -> None:
        # Its own thread: a sweep of many batches never delays study completion. The
        # first one a minute after start (not in the start-up path), then every interval.
        wait = min(60.0, self.settings.retention.interval_s)
        while not self._stop.wait(wait):
            wait = self.settings.retention.interval_s
            try:
                self.retention_sweep()
            except Exception:
                log.exception("retention sweep failed; next try in %.0f s", wait)

    def _completion_loop(self) -> None:
        check_s = self.settings.completion.check_interval_s
        sweep_s = self.settings.deid.sweep_interval_s
        last_check = last_sweep = last_expiry = time.monotonic()
        while not self._stop.wait(min(check_s, sweep_s)):
            now = time.monotonic()
            try:
                if now - last_sweep >= sweep_s * 0.999:
                    last_sweep = now
                    sweep_deid(self.ctx)
                if now - last_check >= check_s * 0.999:
                    last_check = now
                    self.check_completion()
                if now - last_expiry > 10:
                    last_expiry = now
                    self.expire_spool()
                    # the warning and dicomnode_disk_state fire without any traffic
                    self.disk.reading()
                    self.compact_tally()
            except Exception:
                log.exception("completion check or de-identification sweep failed; retrying")


_RUNNING: dict[str, Node] = {}
"""Running nodes by data directory: APScheduler's persistent job store records a job as
an importable function plus picklable arguments, so the scheduled function finds its
node here (one entry per node object in this process)."""


def fire_scheduled_retrain(data_dir: str) -> None:
    """The scheduled job: only enqueue the retraining (the ``train`` queue runs it)."""
    node = _RUNNING.get(data_dir)
    if node is None:
        return
    node.queue.enqueue("retrain", {}, dedup_key=f"retrain:{int(time.time() // 60)}")
    log.info("scheduled retraining of %s queued", node.settings.learning.model)


def start_scheduler(node: Node) -> Any:
    """APScheduler 3 owned by the node, its job store in the node's database.

    One job, ``retrain``, from ``learning.schedule`` (cron) or ``learning.interval_s``;
    ``max_instances=1`` and ``coalesce=True``, so runs missed while the node was down
    fire once when it is back (within a day), and never overlap.
    """
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    lc = node.settings.learning
    key = str(node.files.root)
    _RUNNING[key] = node
    trigger: Any
    try:
        trigger = (
            IntervalTrigger(seconds=lc.interval_s)
            if lc.interval_s
            else CronTrigger.from_crontab(lc.schedule)
        )
    except ValueError as exc:
        raise ConfigError(f"learning.schedule: {exc}") from None
    scheduler = BackgroundScheduler(
        jobstores={"default": SQLAlchemyJobStore(engine=node.engine, tablename="apscheduler_jobs")},
        job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": 86400},
    )
    scheduler.start(paused=True)
    existing = scheduler.get_job("retrain")
    if (
        existing is None
        or str(existing.trigger) != str(trigger)
        or existing.kwargs != {"data_dir": key}
    ):
        # A changed schedule replaces the stored job; an unchanged one keeps its next run
        # time, so a run due while the node was down still fires (once) on start.
        scheduler.add_job(
            fire_scheduled_retrain,
            trigger,
            id="retrain",
            kwargs={"data_dir": key},
            replace_existing=True,
        )
    scheduler.resume()
    return scheduler


def ensure_demo_model(registry: ModelRegistry) -> None:
    """Register and activate each bundled demo model the registry has never had (a fresh
    install gets them all; an upgrade gets a demo added since; a demo the operator
    retired stays retired)."""
    for path in demo_model_paths():
        name = path.name
        if registry.list(name):
            continue
        demo = registry.add(path, created_by="dicomnode (bundled demo)")
        registry.activate(demo.name, demo.version, reason="bundled demo model, first start")
        log.info("registered the bundled demo model %s %s", demo.name, demo.version)


def deid_options(d: DeidSettings) -> DeidOptions:
    """The de-identification engine's options from the ``[deid]`` settings."""
    try:
        return DeidOptions(
            retain_longitudinal_modified_dates=not d.retain_full_dates,
            retain_longitudinal_full_dates=d.retain_full_dates,
            retain_patient_characteristics=d.retain_patient_characteristics,
            clean_descriptors=d.clean_descriptors,
            retain_device_identity=d.retain_device_identity,
            retain_institution_identity=d.retain_institution_identity,
            retain_safe_private=bool(d.safe_private),
            safe_private=tuple(PrivateTagRule(r.creator, r.element, r.vr) for r in d.safe_private),
            patient_name_style=PatientNameStyle(d.patient_name_style),
            age_cap_years=d.age_cap_years,
            keep_text=frozenset(d.keep_text),
            descriptor_words=frozenset(w.upper() for w in d.descriptor_words),
            **(
                {"risky_modalities": frozenset(d.risky_modalities)}
                if d.risky_modalities is not None
                else {}
            ),
            **(
                {"risky_sop_classes": frozenset(d.risky_sop_classes)}
                if d.risky_sop_classes is not None
                else {}
            ),
            mask_rules=tuple(
                MaskRule(
                    regions=tuple(Region(*r) for r in m.regions),
                    keep_ultrasound_regions=m.keep_ultrasound_regions,
                    sop_class_uid=m.sop_class_uid,
                    modality=m.modality,
                    manufacturer=m.manufacturer,
                    manufacturer_model_name=m.manufacturer_model_name,
                    rows=m.rows,
                    columns=m.columns,
                )
                for m in d.mask_rules
            ),
        )
    except ValueError as exc:
        raise ConfigError(f"deid: {exc}") from None


def _cron_of(lc: Any) -> str:
    """learning.schedule, or learning.interval_s as a seconds cron (procrastinate's form)."""
    if lc.interval_s:
        step = max(1, min(59, int(lc.interval_s)))
        return (
            f"* * * * * */{step}"
            if lc.interval_s < 60
            else f"*/{max(1, int(lc.interval_s // 60))} * * * *"
        )
    return str(lc.schedule)


def create_queue(
    settings: NodeSettings,
    sessions: sessionmaker[Session],
    registry: TaskRegistry,
    workers: Mapping[str, int],
) -> JobQueue:
    """The configured queue backend with ``workers`` threads per queue."""
    j = settings.jobs
    if j.backend == "local":
        return LocalQueue(
            sessions,
            registry,
            workers=workers,
            poll_interval_s=j.poll_interval_s,
            lease_s=j.lease_s,
        )
    from dicomnode.jobs.procrastinate_queue import ProcrastinateQueue, apply_schema

    url = settings.queue_url
    assert url is not None  # checked by the configuration
    apply_schema(url)
    queue = ProcrastinateQueue(
        url,
        registry,
        workers=workers,
        poll_interval_s=min(1.0, j.poll_interval_s * 2),
        heartbeat_s=max(1.0, j.stalled_after_s / 4),
        stalled_after_s=j.stalled_after_s,
    )
    if settings.learning.enabled and workers.get("train", 0) > 0:
        queue.add_periodic("retrain_periodic", _cron_of(settings.learning))
    return queue


def create_node(
    settings: NodeSettings, *, scp: bool = True, workers: Mapping[str, int] | None = None
) -> Node:
    """Build a node from settings (nothing runs until :meth:`Node.start`).

    Parameters
    ----------
    scp
        Run the storage SCP (receiver and all-in-one roles).
    workers
        Worker threads per queue; None = ``jobs.workers`` (all-in-one), ``{}`` for a
        receiver that only receives, e.g. ``{"gpu": 1}`` for a GPU worker.

    Raises
    ------
    ConfigError
        A secret is missing or unusable.
    StorageError
        The data directory or database cannot be used.
    """
    data_dir = settings.data_dir.resolve()
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StorageError(f"cannot create data_dir {data_dir}: {exc.strerror}") from exc
    secret = load_secret(settings.deid, data_dir)
    d = settings.deid
    pseudonymizer = Pseudonymizer(
        secret,
        min_shift_days=d.min_shift_days,
        max_shift_days=d.max_shift_days,
        prefix=d.patient_id_prefix,
    )
    deidentifier = Deidentifier(pseudonymizer, deid_options(d))
    engine, sessions = open_database(settings, upgrade=True)
    vault = Vault(engine, vault_key(d, data_dir))
    files = FileStore(data_dir, fsync=settings.storage.fsync,
                      spares=settings.storage.spare_files)
    index = StudyIndex(sessions)
    j = settings.jobs
    registry = TaskRegistry(RetryPolicy(j.max_attempts, j.retry_base_s, j.retry_max_s))
    register_tasks(registry)
    queue = create_queue(settings, sessions, registry, j.workers if workers is None else workers)
    registry_ = model_registry(settings, sessions)
    inf = settings.inference
    sessions_type = IsolatedSessions if inf.isolation == "process" else ModelSessions
    models = sessions_type(runtime_options(settings), inf.memory_budget_mb)
    ctx = TaskContext(
        settings=settings,
        index=index,
        files=files,
        queue=queue,
        deidentifier=deidentifier,
        vault=vault,
        registry=registry_,
        models=models,
        results=ResultStore(sessions, files),
        outbox=Outbox(sessions),
        labels=LabelStore(sessions, files),
    )
    ctx.completion_hooks += [deidentify_pending, route_study]
    ctx.result_hooks += [enqueue_encoding, drift_on_result]
    ctx.deid_hooks.append(enqueue_label)

    server: StorageServer | ReceiverPool | None = None
    ingestor = None
    if scp:
        ingestor = _ingestor(settings, files, index, pseudonymizer)
        processes = settings.scp.effective_processes
        if processes == 1:
            server = _storage_server(settings, ingestor, ctx.outbox)
        else:
            # Receiving processes (scp/pool.py) build their own parts with receive().
            from dicomnode.logsetup import current_logging

            server = ReceiverPool(settings.scp, processes, receive,
                                  (settings, current_logging()))
    return Node(settings, engine, sessions, files, index, queue, ctx, server, ingestor)


def _ingestor(settings: NodeSettings, files: FileStore, index: StudyIndex,
              pseudonymizer: Pseudonymizer) -> Ingestor:
    return Ingestor(
        files,
        index,
        pseudonymizer,
        quiet_period_for=settings.quiet_period_for,
        max_wait_s=settings.completion.max_wait_s,
        deid_delay_s=settings.deid.max_delay_s,
    )


def _storage_server(settings: NodeSettings, ingestor: Ingestor, outbox: Outbox | None,
                    slots: AssociationSlots | None = None) -> StorageServer:
    return StorageServer(
        settings.ae_title,
        settings.scp,
        settings.allowed_calling_aes(),
        ingestor,
        on_commitment=outbox.commitment_report if outbox is not None else None,
        slots=slots,
        disk=disk_guard(settings),
    )


@dataclass
class Receiver:
    """What one receiving process runs (``scp.processes`` > 1): the SCP and what it writes."""

    node: Node
    server: StorageServer
    index: int

    def stop(self, grace_s: float | None = None) -> None:
        self.server.stop(grace_s)
        self.node.engine.dispose()
        self.node.files.close()
        log.info("receiving process %d (pid %d) stopped after %d association(s)",
                 self.index, os.getpid(), self.server.served)


def receive(settings: NodeSettings, logging_as: tuple[bool, Path | None] | None, *,
            listeners: list[Listener], slots: AssociationSlots, index: int) -> Receiver:
    """Run the SCP in a receiving process on the main process's listening sockets.

    Called by ``scp/pool.py`` in each receiving process: it logs like the main process,
    opens its own database engine and file store, and only receives (the main process
    runs the job workers and the completion loop).
    """
    from dicomnode.logsetup import configure_logging

    # as the main process logs (``logging_as``), else as the CLI would configure it
    json_logs, audit_path = logging_as or (
        settings.log_json, settings.audit_file or settings.data_dir.resolve() / "audit.jsonl")
    configure_logging(settings.log_level, json_logs=json_logs, audit_path=audit_path)
    logging.getLogger("pynetdicom").setLevel(
        max(logging.WARNING, logging.getLevelName(settings.log_level)))
    node = create_node(settings, scp=False, workers={})
    ingestor = _ingestor(settings, node.files, node.index, node.ctx.deidentifier.pseudonymizer)
    server = _storage_server(settings, ingestor, node.ctx.outbox, slots)
    server.start(listeners)
    log.info("receiving process %d (pid %d) ready", index, os.getpid())
    return Receiver(node, server, index)
