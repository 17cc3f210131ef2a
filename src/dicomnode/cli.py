"""The ``dicomnode`` command line. The only place that configures logging.

Every command loads the configuration once (``--config`` file, ``DICOMNODE_...``
environment, flags) and exits with status 2 and a one-line message on a
configuration error, 1 on any other refusal, never with a traceback.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from dicomnode import __version__
from dicomnode.config import NodeSettings, load_settings
from dicomnode.errors import ConfigError, NodeError

app = typer.Typer(
    name="dicomnode",
    help="A DICOM node that puts AI next to a PACS.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Configuration.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(db_app, name="db")

log = logging.getLogger("dicomnode")

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML configuration file.", dir_okay=False)
]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="Data directory.")]


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"dicomnode: {message}", err=True)
    return typer.Exit(code)


def _settings(config: Path | None, overrides: dict[str, Any] | None = None) -> NodeSettings:
    try:
        return load_settings(config, overrides)
    except ConfigError as exc:
        raise _fail(f"config error: {exc}", 2) from None


def _setup_logging(settings: NodeSettings) -> None:
    from dicomnode.logsetup import configure_logging

    path = settings.audit_file or settings.data_dir.resolve() / "audit.jsonl"
    try:
        configure_logging(settings.log_level, json_logs=settings.log_json, audit_path=path)
    except OSError as exc:
        raise _fail(f"cannot open the audit trail {path}: {exc.strerror}", 1) from None
    level = settings.log_level
    # pynetdicom's INFO is one line per DIMSE message; keep it at WARNING.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    for noisy in ("alembic", "highdicom", "apscheduler"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False,
) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit(0)


@app.command()
def serve(
    config: ConfigOpt = None,
    port: Annotated[int | None, typer.Option("--port", help="DICOM port.")] = None,
    aet: Annotated[str | None, typer.Option("--aet", help="Our AE title.")] = None,
    data_dir: DataDirOpt = None,
    accept_any_ae: Annotated[
        bool, typer.Option("--accept-any-ae", help="Accept any calling AE title.")
    ] = False,
    role: Annotated[
        str, typer.Option(help="all: receive and work (default); receiver: receive only.")
    ] = "all",
) -> None:
    """Start the node; SIGTERM or Ctrl-C stops it cleanly."""
    if role not in ("all", "receiver"):
        raise _fail(f"--role must be all or receiver, got {role!r}", 2)
    overrides: dict[str, Any] = {}
    if port is not None:
        overrides.setdefault("scp", {})["port"] = port
    if accept_any_ae:
        overrides.setdefault("scp", {})["accept_any_ae"] = True
    if aet is not None:
        overrides["ae_title"] = aet
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    settings = _settings(config, overrides)
    if role == "receiver" and settings.jobs.backend == "local":
        raise _fail(
            "config error: jobs.backend: a receiver-only node needs the procrastinate "
            "backend (workers in other processes run its jobs)",
            2,
        )
    _setup_logging(settings)
    _audit_config(settings, config)
    _run_until_signal(settings, scp=True, workers={} if role == "receiver" else None)


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated queues to work on, e.g. gpu,cpu.")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Run job workers only (no SCP): scale-out with the procrastinate backend."""
    settings = _settings(config, {"data_dir": data_dir} if data_dir else None)
    _setup_logging(settings)
    _audit_config(settings, config)
    names = [q.strip() for q in queues.split(",") if q.strip()]
    if not names:
        raise _fail("--queues: name at least one queue", 2)
    if settings.jobs.backend == "local":
        raise _fail(
            "config error: jobs.backend: worker processes need the procrastinate "
            "backend (the local queue belongs to one process)",
            2,
        )
    _run_until_signal(
        settings, scp=False, workers={q: settings.jobs.workers.get(q, 1) or 1 for q in names}
    )


def _audit_config(settings: NodeSettings, config: Path | None) -> None:
    from dicomnode.audit import audit

    # the digest leaves secrets out: SecretStr dumps as asterisks
    audit(
        "config_loaded",
        config_digest=hashlib.sha256(settings.model_dump_json().encode()).hexdigest(),
        source=str(config) if config else "defaults and environment",
    )


def _run_until_signal(settings: NodeSettings, *, scp: bool, workers: dict[str, int] | None) -> None:
    from dicomnode.app import create_node

    try:
        node = create_node(settings, scp=scp, workers=workers)
        node.start()
    except ConfigError as exc:
        raise _fail(f"config error: {exc}", 2) from None
    except (NodeError, OSError) as exc:
        raise _fail(str(exc), 1) from None

    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    ports = ", ".join(f"{k} {v}" for k, v in (node.server.ports if node.server else {}).items())
    queues = ",".join(sorted(q for q, n in (workers or settings.jobs.workers).items() if n))
    log.info(
        "dicomnode %s serving as %s (%s; queues %s); data in %s",
        __version__,
        settings.ae_title,
        ports or "no SCP",
        queues or "none",
        settings.data_dir.resolve(),
    )
    while not stop.wait(0.5):
        pass
    node.stop()
    log.info("stopped")
    logging.shutdown()
    # Everything of ours is stopped and flushed. Skip interpreter teardown: after a
    # training run, torch's and ONNX Runtime's native thread pools can abort the process
    # ("terminate called without an active exception") while Python finalises modules.
    os._exit(0)


@app.command()
def echo(
    host: str,
    port: int,
    aet: Annotated[str, typer.Option("--aet", help="Our (calling) AE title.")] = "DICOMNODE",
    aec: Annotated[str, typer.Option("--aec", help="The peer's (called) AE title.")] = "ANY-SCP",
    timeout: Annotated[float, typer.Option(help="Seconds.")] = 10.0,
) -> None:
    """C-ECHO a peer; exit 0 on success."""
    from dicomnode.scp.scu import echo as c_echo

    try:
        t0 = time.monotonic()
        status = c_echo(host, port, calling_ae=aet, called_ae=aec, timeout_s=timeout)
    except NodeError as exc:
        raise _fail(str(exc), 1) from None
    ms = (time.monotonic() - t0) * 1000
    typer.echo(f"C-ECHO {aec}@{host}:{port}: status 0x{status:04X} ({ms:.0f} ms)")
    if status != 0:
        raise typer.Exit(1)


studies_app = typer.Typer(
    help="Indexed studies (pseudonymous keys): state, outcome, series, instances.",
    invoke_without_command=True,
)
app.add_typer(studies_app, name="studies")


def _since(value: str) -> float:
    """Epoch seconds of ``--since``: an age (``90m``, ``24h``, ``7d``, ``3600s``) before
    now, or an ISO 8601 date/time (UTC when it carries no offset)."""
    import datetime as dt
    import time as _time

    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    v = value.strip()
    if v[:-1].isdigit() and v[-1:].lower() in units:
        return _time.time() - int(v[:-1]) * units[v[-1].lower()]
    try:
        t = dt.datetime.fromisoformat(v)
    except ValueError:
        raise ValueError(f"{value!r} is neither an age (24h, 7d) nor an ISO date/time") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.timestamp()


@studies_app.callback()
def studies(
    ctx: typer.Context,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
    limit: Annotated[int, typer.Option(
        "--limit", min=0, help="At most this many studies, newest first (0: all).")] = 100,
    offset: Annotated[int, typer.Option("--offset", min=0, help="Skip this many first.")] = 0,
    since: Annotated[str | None, typer.Option(
        "--since", help="Only studies received since: an ISO date/time (UTC unless it says)"
        " or an age such as 90m, 24h, 7d.")] = None,
) -> None:
    """List indexed studies with series / instance counts, state and outcome, a page at a
    time like ``/api/studies`` (newest first)."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        since_ts = _since(since) if since else None
    except ValueError as exc:
        raise _fail(f"--since: {exc}", 2) from None
    settings = _settings(config, {"data_dir": data_dir} if data_dir else None)
    from dicomnode.app import open_database
    from dicomnode.storage.index import StudyIndex

    try:
        engine, sessions = open_database(settings, upgrade=False)
    except NodeError as exc:
        raise _fail(str(exc), 1) from None
    rows = StudyIndex(sessions).studies(limit=limit or None, offset=offset, since=since_ts)
    engine.dispose()
    if as_json:
        typer.echo(json.dumps([r.as_dict() for r in rows], indent=2))
        return
    if not rows:
        typer.echo("no studies")
        return
    typer.echo(
        f"{'ID':>4}  {'STUDY KEY':<46} {'STATE':<10} {'VER':>3} {'SER':>3} {'INST':>5}  "
        f"{'MOD':<8} OUTCOME"
    )
    for r in rows:
        reason = f" ({r.outcome_reason})" if r.outcome_reason else ""
        typer.echo(
            f"{r.id:>4}  {r.study_key:<46} {r.state:<10} {r.version:>3} {r.series:>3} "
            f"{r.instances:>5}  {','.join(r.modalities):<8} {r.outcome}{reason}"
        )


@studies_app.command("retry")
def studies_retry(
    study_id: Annotated[int, typer.Argument(help="Study ID (from `dicomnode studies`).")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Process a study in a final outcome again (a new run of its current version; audited)."""
    from dicomnode.api import actions

    with _operator(config, data_dir) as (svc, who):
        run = actions.retry_study(svc, study_id, who)
    typer.echo(f"study {study_id} queued for processing again (run {run})")


vault_app = typer.Typer(
    help="The encrypted identity vault (every read is recorded).", no_args_is_help=True
)
quarantine_app = typer.Typer(
    help="Objects kept apart by the de-identification policy.", no_args_is_help=True
)
app.add_typer(vault_app, name="vault")
app.add_typer(quarantine_app, name="quarantine")
patients_app = typer.Typer(
    help="One patient's data, found through the vault (operator requests).",
    no_args_is_help=True,
)
retention_app = typer.Typer(help="Removal of what [retention] says has expired.",
                            no_args_is_help=True)
app.add_typer(patients_app, name="patients")
app.add_typer(retention_app, name="retention")


@patients_app.command("delete")
def patients_delete(
    patient_id: Annotated[str, typer.Option("--patient-id", help="The original Patient ID.")],
    issuer: Annotated[str, typer.Option(help="Issuer of Patient ID, if the sender sets one.")]
    = "",
    operator: Annotated[str, typer.Option(help="Who is asking (recorded).")] = "",
    force: Annotated[bool, typer.Option(
        "--force", help="Also studies still in use (pending delivery, running job).")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Delete every study of one patient: archive, results, labels, index rows and vault
    entries. The Patient ID is turned into its pseudonym with the node's key (the index
    and the vault hold only that); the deletion is audited (``patient_deleted``)."""
    import getpass

    settings = _settings(config, {"data_dir": data_dir} if data_dir else None)
    _setup_logging(settings)
    from dicomnode.dicom.pseudonym import Pseudonymizer
    from dicomnode.storage.keys import load_secret
    from dicomnode.storage.retention import delete_patient
    from dicomnode.storage.spool import FileStore

    d = settings.deid
    try:
        pseudo = Pseudonymizer(load_secret(d, settings.data_dir.resolve()),
                               min_shift_days=d.min_shift_days,
                               max_shift_days=d.max_shift_days, prefix=d.patient_id_prefix)
    except (ConfigError, NodeError) as exc:
        raise _fail(str(exc), 1) from None
    pid = pseudo.patient_id(Pseudonymizer.patient_key(patient_id, issuer))
    if not yes:
        typer.confirm(f"delete every study of patient {pid} (pseudonym)?", abort=True)
    engine, sessions = _open_node_storage(settings)
    files = FileStore(settings.data_dir.resolve(), fsync=settings.storage.fsync, spares=0)
    who = f"operator:{operator or getpass.getuser()}"
    try:
        report, kept = delete_patient(sessions, files, pid, who=who, force=force)
    finally:
        files.close()
        engine.dispose()
    typer.echo(f"patient {pid}: {report.studies} studies ({report.instances} instances, "
               f"{report.files} files) deleted"
               + (f"; {len(kept)} still in use kept (--force deletes them)" if kept else ""))
    if not report.studies and not kept:
        raise _fail(f"no study of patient {pid}", 1)


@retention_app.command("sweep")
def retention_sweep(config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Run one retention sweep now (the node runs one daily) and print what it removed."""
    settings = _settings(config, {"data_dir": data_dir} if data_dir else None)
    _setup_logging(settings)
    from dicomnode.storage.retention import sweep
    from dicomnode.storage.spool import FileStore

    engine, sessions = _open_node_storage(settings)
    files = FileStore(settings.data_dir.resolve(), fsync=settings.storage.fsync, spares=0)
    try:
        r = sweep(engine, sessions, files, settings.retention, who=settings.ae_title,
                  audit_path=settings.audit_file or settings.data_dir.resolve() / "audit.jsonl")
    finally:
        files.close()
        engine.dispose()
    typer.echo(json.dumps({k: v for k, v in r.__dict__.items() if k != "removed_study_keys"}))


def _open_node_storage(settings: NodeSettings):  # type: ignore[no-untyped-def]
    from dicomnode.app import open_database

    try:
        return open_database(settings, upgrade=False)
    except NodeError as exc:
        raise _fail(str(exc), 1) from None


@app.command()
def deid(
    inputs: Annotated[list[Path], typer.Argument(help="DICOM files or folders.", exists=True)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.", file_okay=False)],
    include_at_risk: Annotated[
        bool,
        typer.Option(
            "--include-at-risk",
            help="Also write objects at risk of identifying pixels or content (US, SC, "
            "burned-in annotation, SR, PDF...) that no mask rule cleaned.",
        ),
    ] = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """De-identify files offline with the node's engine and keys (nothing enters the vault).

    Output files are named by their pseudonymous SOP Instance UID. Files that are
    not DICOM, or cannot be de-identified safely, are listed and skipped. Objects at
    risk of identifying pixels or content (ultrasound, secondary capture, burned-in
    annotation, SR, encapsulated PDF...) follow the node's quarantine policy
    (``deid.quarantine_risky``): not written unless a mask rule cleaned them or
    ``--include-at-risk`` is given. The summary counts what was held back and why.
    """
    settings = _settings(config, {"data_dir": data_dir} if data_dir else None)
    from dicomnode.logsetup import configure_logging

    # pydicom's warnings quote the values they complain about: scrubbed like the node's
    configure_logging(settings.log_level, json_logs=settings.log_json, audit_path=None)
    from dicomnode.app import deid_options
    from dicomnode.dicom.deid import Deidentifier, deidentify_bytes
    from dicomnode.dicom.pseudonym import Pseudonymizer
    from dicomnode.storage.keys import load_secret

    try:
        d = settings.deid
        secret = load_secret(d, settings.data_dir.resolve())
        engine = Deidentifier(
            Pseudonymizer(
                secret,
                min_shift_days=d.min_shift_days,
                max_shift_days=d.max_shift_days,
                prefix=d.patient_id_prefix,
            ),
            deid_options(d),
        )
    except ConfigError as exc:
        raise _fail(f"config error: {exc}", 2) from None
    files = [
        f for p in inputs for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()
    ]
    out.mkdir(parents=True, exist_ok=True)
    # the node's rule (pipeline/deid.py): quarantine when the engine says so and the
    # policy is on; a mask rule that cleaned the pixels has already cleared its flags
    hold_back = d.quarantine_risky and not include_at_risk
    done = skipped = flagged = 0
    held: dict[str, int] = {}
    for f in files:
        try:
            result = deidentify_bytes(f.read_bytes(), engine)
        except NodeError as exc:
            typer.echo(f"skipped {f}: {exc}", err=True)
            skipped += 1
            continue
        reason = ",".join(x.value for x in result.result.flags)
        if result.result.quarantine and hold_back:
            held[reason] = held.get(reason, 0) + 1
            typer.echo(f"{f}: at risk ({reason}), not written", err=True)
            continue
        (out / f"{result.result.sop_instance_uid}.dcm").write_bytes(result.data)
        done += 1
        if result.result.flags:
            flagged += 1
            typer.echo(f"{f}: at risk ({reason}), written", err=True)
    summary = f"{done} de-identified into {out}, {skipped} skipped, {flagged} flagged"
    if held:
        reasons = "; ".join(f"{n} {r}" for r, n in sorted(held.items()))
        summary += (f", {sum(held.values())} at risk not written ({reasons}; "
                    "--include-at-risk writes them)")
    typer.echo(summary)
    if skipped and not done and not held:
        raise typer.Exit(1)


@vault_app.command("show")
def vault_show(
    pseudonym: Annotated[str, typer.Argument(help="Pseudonymous study UID, Patient ID or UID.")],
    operator: Annotated[str, typer.Option(help="Who is asking (recorded).")] = "",
    reason: Annotated[str, typer.Option(help="Why (recorded).")] = "vault show",
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Print what a pseudonym stands for. For authorised operators; the read is recorded."""
    import getpass

    settings = _settings(config, {"data_dir": data_dir} if data_dir else None)
    _setup_logging(settings)  # the audit trail records this operator action
    from dicomnode.storage.keys import vault_key
    from dicomnode.storage.vault import Vault

    engine, _ = _open_node_storage(settings)
    try:
        vault = Vault(engine, vault_key(settings.deid, settings.data_dir.resolve()))
        actor = f"operator:{operator or getpass.getuser()}"
        with vault.reader(actor, reason, pseudonym) as r:
            studies = [pseudonym] if r.identity(pseudonym) else r.studies_of_patient(pseudonym)
            result: dict[str, Any] = {}
            if studies:
                result["studies"] = {k: r.identity(k).to_json() for k in studies}  # type: ignore[union-attr]
            else:
                original = r.original_uid(pseudonym)
                if original is not None:
                    result["uid"] = original
    except (ConfigError, NodeError) as exc:
        raise _fail(str(exc), 1) from None
    finally:
        engine.dispose()
    if not result:
        raise _fail(f"no vault entry for {pseudonym}", 1)
    typer.echo(json.dumps(result, indent=2, ensure_ascii=False))


@quarantine_app.command("list")
def quarantine_list(
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
) -> None:
    """Instances quarantined (risk of burned-in identity) or failed de-identification."""
    settings = _settings(config, {"data_dir": data_dir} if data_dir else None)
    from sqlalchemy import select

    from dicomnode.storage.models import Instance, Study

    engine, sessions = _open_node_storage(settings)
    with sessions() as s:
        rows = s.execute(
            select(
                Instance.id,
                Study.study_key,
                Instance.sop_class_uid,
                Instance.state,
                Instance.error,
                Instance.path,
            )
            .join(Study, Study.id == Instance.study_id)
            .where(Instance.state.in_(["quarantined", "failed"]))
            .order_by(Instance.id)
        ).all()
    engine.dispose()
    items = [
        dict(zip(("id", "study_key", "sop_class_uid", "state", "reason", "path"), r, strict=True))
        for r in rows
    ]
    if as_json:
        typer.echo(json.dumps(items, indent=2))
        return
    if not items:
        typer.echo("quarantine is empty")
    for i in items:
        typer.echo(f"{i['id']:>6}  {i['state']:<11} {i['study_key']}  {i['reason']}")


models_app = typer.Typer(help="The model registry.", no_args_is_help=True)
app.add_typer(models_app, name="models")


def _registry(settings: NodeSettings):  # type: ignore[no-untyped-def]
    from dicomnode.app import model_registry

    engine, sessions = _open_node_storage(settings)
    return engine, model_registry(settings, sessions)


@models_app.command("list")
def models_list(
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
) -> None:
    """Registered model versions: status, checksum, who added them and when."""
    settings = _settings(config, {"data_dir": data_dir} if data_dir else None)
    engine, registry = _registry(settings)
    items = [m.as_dict() for m in registry.list()]
    engine.dispose()
    if as_json:
        typer.echo(json.dumps(items, indent=2))
        return
    if not items:
        typer.echo("no models (serve registers the bundled demo model on first start)")
    for m in items:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(m["created_at"]))
        typer.echo(
            f"{m['name']:<20} {m['version']:<12} {m['status']:<9} {m['sha256'][:12]}  "
            f"{when}  {m['created_by']}  {m['reason'] or ''}"
        )


@models_app.command("add")
def models_add(
    path: Annotated[Path, typer.Argument(help="Model package directory or archive.", exists=True)],
    activate: Annotated[bool, typer.Option(help="Also make it the active version.")] = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Register a model package (checked against its ONNX graph first)."""
    settings = _settings(config, {"data_dir": data_dir} if data_dir else None)
    _setup_logging(settings)  # the audit trail records this operator action
    from dicomnode.inference import load_model_package

    try:
        load_model_package(path)  # the full check, graph included
        engine, registry = _registry(settings)
        m = registry.add(path)
        if activate:
            m = registry.activate(m.name, m.version, reason="activated when added")
        engine.dispose()
    except NodeError as exc:
        raise _fail(str(exc), 1) from None
    typer.echo(f"registered {m.name} {m.version} ({m.status})")


@models_app.command("activate")
def models_activate(
    name: str,
    version: str,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Make a version the active one of its model (new jobs use it)."""
    from dicomnode.api import actions

    with _operator(config, data_dir) as (svc, who):
        m = actions.promote(svc, name, version, "activated by an operator", who)
    typer.echo(f"{m.name} {m.version} is active")


def _whoami() -> str:
    import getpass

    return f"operator:{getpass.getuser()}"


def _import_extra_missing(exc: ImportError) -> typer.Exit:
    return _fail(f"importers need the import extra (pip install 'dicomnode[import]'): {exc}", 1)


CodesOpt = Annotated[Path | None, typer.Option(
    "--codes", help="Label name -> SNOMED CT codes and colours (JSON or TOML).")]
GenericOpt = Annotated[bool, typer.Option(
    "--generic-codes", help="Code labels without a code as 'Anatomical Structure'.")]


@models_app.command("import-nnunet")
def models_import_nnunet(
    results_dir: Annotated[Path, typer.Argument(
        help="nnU-Net v2 model folder (<Trainer>__<Plans>__<configuration>) or its dataset "
             "folder.", exists=True, file_okay=False)],
    out: Annotated[Path, typer.Option("--out", help="Package directory to write.")],
    configuration: Annotated[str, typer.Option("--configuration")] = "3d_fullres",
    folds: Annotated[str | None, typer.Option(
        "--folds", help="Comma-separated fold numbers, or 'all' (fold_all); default: every "
                        "fold with the checkpoint.")] = None,
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="final or best.")] = "final",
    axes: Annotated[str | None, typer.Option(
        "--axes", help="Training images' axis codes in nnU-Net's array order: SPL "
                       "(SimpleITK from DICOM), SAL (dcm2niix), SAR (RAS-resampled).")] = None,
    training_image: Annotated[Path | None, typer.Option(
        "--training-image", help="Read the axis codes from one training image's header.",
        exists=True, dir_okay=False)] = None,
    name: Annotated[str | None, typer.Option("--name")] = None,
    version: Annotated[str, typer.Option("--version")] = "1.0.0",
    codes: CodesOpt = None,
    generic_codes: GenericOpt = False,
    batch: Annotated[int, typer.Option("--batch", help="Patches per network run.")] = 2,
) -> None:
    """Import an nnU-Net v2 results folder as a format 2 package (offline; needs torch and
    nnunetv2). Refuses, with the reason, what the package cannot express."""
    fold_list = None
    if folds:
        fold_list = ["all" if f.strip() == "all" else int(f) for f in folds.split(",")]
    try:
        from dicomnode.importers.nnunet import import_nnunet
    except ImportError as exc:
        raise _import_extra_missing(exc) from None
    try:
        report = import_nnunet(results_dir, out, configuration=configuration, folds=fold_list,
                               checkpoint=checkpoint, axes=axes, training_image=training_image,
                               name=name, version=version, codes_file=codes,
                               generic_codes=generic_codes, batch=batch)
    except NodeError as exc:
        raise _fail(str(exc), 1) from None
    typer.echo(json.dumps(report.as_dict(), indent=2))


@models_app.command("import-monai")
def models_import_monai(
    bundle_dir: Annotated[Path, typer.Argument(
        help="MONAI bundle directory (configs/metadata.json, configs/inference.json|yaml, "
             "models/).", exists=True, file_okay=False)],
    out: Annotated[Path, typer.Option("--out", help="Package directory to write.")],
    axes: Annotated[str | None, typer.Option(
        "--axes", help="Replace Orientationd's axis codes (e.g. LPS for Decathlon-trained "
                       "bundles).")] = None,
    reference: Annotated[Path | None, typer.Option(
        "--reference", help="A DICOM-derived case known to be right (.npz: volume, affine, "
                            "labels); the bundle's own inference must match it.",
        exists=True, dir_okay=False)] = None,
    name: Annotated[str | None, typer.Option("--name")] = None,
    version: Annotated[str | None, typer.Option("--version")] = None,
    codes: CodesOpt = None,
    generic_codes: GenericOpt = False,
) -> None:
    """Import a MONAI bundle as a format 2 package (offline; needs torch and monai). Refuses
    Lambda transforms and custom code with the reason."""
    try:
        from dicomnode.importers.monai_bundle import import_monai
    except ImportError as exc:
        raise _import_extra_missing(exc) from None
    try:
        report = import_monai(bundle_dir, out, axes=axes, reference=reference, name=name,
                              version=version, codes_file=codes, generic_codes=generic_codes)
    except NodeError as exc:
        raise _fail(str(exc), 1) from None
    typer.echo(json.dumps(report.as_dict(), indent=2))


@models_app.command("export-labels")
def models_export_labels(
    out: Annotated[Path, typer.Option("--out", help="nnU-Net raw folder (nnUNet_raw).")],
    dataset_id: Annotated[int, typer.Option("--dataset-id", help="nnU-Net dataset id.")],
    name: Annotated[str, typer.Option("--name", help="Dataset name.")] = "NodeLabels",
    folds: Annotated[int, typer.Option("--folds", help="Folds, by patient.")] = 5,
    channel: Annotated[str, typer.Option("--channel", help="nnU-Net channel name.")] = "CT",
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Export the node's consensus labels as an nnU-Net raw dataset (splits_final.json by
    patient) and a MONAI datalist (needs the import extra)."""
    settings = _settings(config, {"data_dir": data_dir} if data_dir else None)
    _setup_logging(settings)  # the audit trail records that labelled data left the node
    try:
        from dicomnode.importers.datasets import node_labelled_volumes, write_nnunet_raw
    except ImportError as exc:
        raise _import_extra_missing(exc) from None
    from dicomnode.app import create_node

    try:
        node = create_node(settings, scp=False)
        labels, volumes = node_labelled_volumes(node.ctx)
        folder = write_nnunet_raw(volumes, out, dataset_id=dataset_id, name=name,
                                  labels=labels, channel=channel, folds=folds,
                                  seed=settings.learning.split_seed)
        node.engine.dispose()
    except NodeError as exc:
        raise _fail(str(exc), 1) from None
    from dicomnode.audit import audit

    audit("operator_action", user=_whoami(), action="labels exported (nnU-Net raw dataset)",
          dataset=folder.name, cases=len(list(
        (folder / "labelsTr").glob("*.nii.gz"))))
    typer.echo(str(folder))


outbox_app = typer.Typer(
    help="Result objects waiting for or done with delivery.", no_args_is_help=True
)
app.add_typer(outbox_app, name="outbox")


@contextmanager
def _operator(config: Path | None, data_dir: Path | None) -> Iterator[tuple[Any, Any]]:
    """The same actions as the API's, for an operator at the shell: audited, one
    implementation (dicomnode.api.actions), on the configured queue backend."""
    import getpass

    from dicomnode.api.auth import Principal
    from dicomnode.api.services import ApiServices
    from dicomnode.app import create_queue
    from dicomnode.jobs.base import RetryPolicy, TaskRegistry

    settings = _settings(config, {"data_dir": data_dir} if data_dir else None)
    _setup_logging(settings)  # the audit trail records the action
    engine, sessions = _open_node_storage(settings)
    tasks = TaskRegistry()
    # enqueue-only: the names and queues of the tasks operator actions start
    tasks.register(
        "send_result", lambda ctx, **kw: None, queue="send", retry=RetryPolicy(max_attempts=1)
    )
    tasks.register("study_complete", lambda ctx, **kw: None, queue="default")
    queue = create_queue(settings, sessions, tasks, workers={})
    try:
        yield (
            ApiServices.over(settings, sessions, enqueue=queue.enqueue),
            Principal(f"operator:{getpass.getuser()}", None),
        )
    except NodeError as exc:
        raise _fail(str(exc), 1) from None
    finally:
        queue.stop()
        engine.dispose()


def _outbox(settings: NodeSettings):  # type: ignore[no-untyped-def]
    from dicomnode.storage.outbox import Outbox

    engine, sessions = _open_node_storage(settings)
    return engine, sessions, Outbox(sessions)


@outbox_app.command("list")
def outbox_list(
    status: Annotated[str | None, typer.Option(help="Only this status.")] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
) -> None:
    """Outbox items: pending, sent, dead (attempts exhausted), dropped, unroutable."""
    settings = _settings(config, {"data_dir": data_dir} if data_dir else None)
    engine, _, outbox = _outbox(settings)
    items = [
        {
            c: getattr(i, c)
            for c in (
                "id",
                "study_id",
                "study_version",
                "kind",
                "model_name",
                "model_version",
                "destination",
                "status",
                "attempts",
                "last_error",
                "sop_instance_uid",
                "supersedes",
                "created_at",
                "sent_at",
                "next_attempt_at",
            )
        }
        for i in outbox.list(status)
    ]
    engine.dispose()
    if as_json:
        typer.echo(json.dumps(items, indent=2))
        return
    if not items:
        typer.echo("outbox is empty")
    for i in items:
        typer.echo(
            f"{i['id']:>5}  {i['status']:<10} {i['kind']:<4} study {i['study_id']} "
            f"v{i['study_version']}  {i['model_name']} {i['model_version']} -> "
            f"{i['destination']}  attempts {i['attempts']}  {i['last_error'] or ''}"
        )


@outbox_app.command("retry")
def outbox_retry(
    item_id: Annotated[int, typer.Argument(help="Outbox item ID.")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Send a dead (or unroutable, dropped) item again now, with a fresh attempt count."""
    from dicomnode.api import actions

    with _operator(config, data_dir) as (svc, who):
        actions.retry_outbox(svc, item_id, who)
    typer.echo(f"outbox item {item_id} queued for delivery")


@outbox_app.command("drop")
def outbox_drop(
    item_id: Annotated[int, typer.Argument(help="Outbox item ID.")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Give up on an item: it will not be sent (the object stays under results/)."""
    from dicomnode.api import actions

    with _operator(config, data_dir) as (svc, who):
        actions.drop_outbox(svc, item_id, who)
    typer.echo(f"outbox item {item_id} dropped")


@models_app.command("promote")
def models_promote(
    name: str,
    version: str,
    reason: Annotated[str, typer.Option(help="Why (recorded).")] = "promoted by an operator",
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Put a candidate (or any version) into service, bypassing the gate."""
    from dicomnode.api import actions

    with _operator(config, data_dir) as (svc, who):
        m = actions.promote(svc, name, version, reason, who)
    typer.echo(f"{m.name} {m.version} is active")


@models_app.command("rollback")
def models_rollback(
    name: str,
    reason: Annotated[str, typer.Option(help="Why (recorded).")] = "rolled back by an operator",
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Re-activate the version that served before the current one."""
    from dicomnode.api import actions

    with _operator(config, data_dir) as (svc, who):
        m = actions.rollback(svc, name, reason, who)
    typer.echo(f"{m.name} {m.version} is active again")


@models_app.command("stats")
def models_stats(
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
) -> None:
    """Drift: Dice of production predictions against labels that arrived later."""
    settings = _settings(config, {"data_dir": data_dir} if data_dir else None)
    from dicomnode.storage.labels import LabelStore
    from dicomnode.storage.spool import FileStore
    from dicomnode.training.drift import DriftRecord, format_drift_table, summarize_drift

    engine, sessions = _open_node_storage(settings)
    rows = LabelStore(sessions, FileStore(settings.data_dir.resolve())).drift()
    engine.dispose()
    records = [
        DriftRecord(
            study_key=str(r.study_id),
            model_name=r.model_name,
            model_version=r.model_version,
            dice={int(k): v for k, v in r.dice.items()},
            # no label in either mask counts as agreement, as drift.py does
            mean_dice=sum(r.dice.values()) / len(r.dice) if r.dice else 1.0,
            recorded_at=r.at,
        )
        for r in rows
    ]
    summaries = summarize_drift(records)
    if as_json:
        typer.echo(json.dumps([s.__dict__ for s in summaries], indent=2, default=str))
        return
    typer.echo(format_drift_table(summaries) if summaries else "no drift records yet")


@app.command()
def train(
    now: Annotated[
        bool, typer.Option("--now", help="Run the retraining in the foreground.")
    ] = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Run the scheduled retraining job now, in the foreground (needs the [train] extra)."""
    if not now:
        raise _fail("use --now (the node runs it on its schedule otherwise)", 2)
    settings = _settings(config, {"data_dir": data_dir} if data_dir else None)
    _setup_logging(settings)
    from dicomnode.app import create_node
    from dicomnode.pipeline.learning import run_retrain

    try:
        node = create_node(settings, scp=False)
        record = run_retrain(node.ctx, force=True)
        node.engine.dispose()
    except NodeError as exc:
        raise _fail(str(exc), 1) from None
    typer.echo(json.dumps(record, indent=2))
    if record["status"] == "failed":
        raise typer.Exit(1)


@app.command("demo-study")
def demo_study(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.", file_okay=False)],
    seed: Annotated[int, typer.Option(help="Random seed (another seed, other lesions).")] = 7,
    slices: Annotated[int, typer.Option(help="Number of slices.")] = 32,
    kind: Annotated[str, typer.Option(
        help="ct: a CT study with lesions; radiograph: a PA chest radiograph (DX), with a "
             "nodule unless --no-nodule.")] = "ct",
    nodule: Annotated[bool, typer.Option(help="radiograph: plant a nodule.")] = True,
    monochrome1: Annotated[bool, typer.Option(
        help="radiograph: store it MONOCHROME1 (white is low).")] = False,
) -> None:
    """Write a phantom study (CT with known lesions, or a chest radiograph) to send with
    storescu."""
    if kind == "radiograph":
        from dicomnode.dicom.radiograph import make_chest_radiograph

        ph = make_chest_radiograph(
            seed=seed, nodule=nodule, patient_id=f"DEMO-CXR-{seed:04d}",
            photometric="MONOCHROME1" if monochrome1 else "MONOCHROME2")
        out.mkdir(parents=True, exist_ok=True)
        ph.dataset.save_as(out / "dx0000.dcm", enforce_file_format=True)
        typer.echo(f"1 DX chest radiograph ({'with' if nodule else 'without'} a nodule) "
                   f"in {out}")
        return
    if kind != "ct":
        raise _fail(f"--kind must be ct or radiograph, got {kind!r}", 2)
    from dicomnode.dicom.phantom import make_ct_study

    study = make_ct_study(
        seed=seed,
        n_slices=slices,
        patient_id=f"DEMO-{seed:04d}",
        patient_name=f"Demo^Patient{seed}",
    )
    out.mkdir(parents=True, exist_ok=True)
    for i, ds in enumerate(study.datasets):
        ds.save_as(out / f"ct{i:04d}.dcm", enforce_file_format=True)
    typer.echo(f"{len(study.datasets)} CT slices with {len(study.lesions)} lesion(s) in {out}")


@config_app.command("check")
def config_check(
    file: Annotated[Path, typer.Argument(help="TOML configuration file.", dir_okay=False)],
) -> None:
    """Validate a config file and print the effective settings (secrets hidden)."""
    settings = _settings(file)
    data = settings.model_dump(mode="json")
    data["database_url"] = settings.effective_database_url
    typer.echo(json.dumps(data, indent=2))


@db_app.command("upgrade")
def db_upgrade(
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
) -> None:
    """Apply the schema migrations (Alembic) to the configured database."""
    settings = _settings(config, {"data_dir": data_dir} if data_dir else None)
    _setup_logging(settings)
    from dicomnode.storage.db import create_db_engine, migrate, schema_state

    try:
        engine = create_db_engine(settings.effective_database_url)
        migrate(engine, revision)
        current, head = schema_state(engine)
    except NodeError as exc:
        raise _fail(str(exc), 1) from None
    typer.echo(f"database at revision {current} (head {head})")


def main() -> None:
    """Console-script entry point."""
    app()
