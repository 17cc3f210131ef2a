"""One SQLAlchemy engine per process, and the schema migrations.

SQLite runs in WAL mode with ``synchronous=NORMAL``: a committed row survives a
crash of the process; a power cut can lose the last transactions but never
corrupts the file. That is enough because every received object is fsynced to
the spool before its row is written, and start-up indexes spool files that lack a
row (DESIGN.md, "Receiving"). Every write transaction starts with ``BEGIN IMMEDIATE``:
the writer lock is taken up front, so two threads never deadlock upgrading a
read transaction (which SQLite answers with an immediate SQLITE_BUSY that no
busy timeout helps). Our transactions are short, so serialising them is cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.errors import StorageError

__all__ = ["create_db_engine", "migrate", "schema_state", "session_factory"]

_MIGRATIONS = Path(__file__).with_name("migrations")


def create_db_engine(url: str, *, busy_timeout_s: float = 30.0) -> Engine:
    """Create the process's engine for ``url`` (SQLite tuned as described above)."""
    if url.startswith("sqlite"):
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": busy_timeout_s},
            pool_size=8,
            max_overflow=24,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # Reads through engine.execution_options(dicomnode_read_only=True) take no lock.
            if conn.get_execution_options().get("dicomnode_read_only"):
                conn.exec_driver_sql("BEGIN")
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return create_engine(url, pool_size=8, max_overflow=24, pool_pre_ping=True)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes after commit (rows are passed on as values)."""
    return sessionmaker(engine, expire_on_commit=False)


def _alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def schema_state(engine: Engine) -> tuple[str | None, str]:
    """Return (current revision or None for an empty database, head revision)."""
    head = ScriptDirectory.from_config(_alembic_config(engine)).get_current_head()
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    return current, str(head)


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the schema to ``revision`` (Alembic).

    Raises
    ------
    StorageError
        If the database cannot be reached or a migration fails.
    """
    try:
        command.upgrade(_alembic_config(engine), revision)
    except SQLAlchemyError as exc:
        raise StorageError(f"database migration failed: {exc.__class__.__name__}: {exc}") from exc
