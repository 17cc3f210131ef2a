"""Shared fixtures: real SQLite and PostgreSQL databases, phantom files, the node process."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from nodeutil import write_study
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from dicomnode.dicom.phantom import make_ct_study

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database on 127.0.0.1:5432, dropped afterwards.

    Without a reachable server the test is skipped, except under CI (``CI`` set),
    where PostgreSQL is part of the machine and its absence is a failure.
    """
    name = f"dicomnode_t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        admin.dispose()
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no PostgreSQL on 127.0.0.1:5432 ({exc.__class__.__name__})")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs on SQLite (WAL file) and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(scope="session")
def ct50_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A 50-instance synthetic CT series on disk (64x64 slices)."""
    study = make_ct_study(n_slices=50, rows=64, columns=64, seed=50, patient_id="PAT-CT50")
    return write_study(study, tmp_path_factory.mktemp("ct50"))
