"""`dicomnode studies` pages like /api/studies: --limit, --offset, --since."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from bulkfill import fill
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.storage.db import create_db_engine, migrate

NOW = 1_900_000_000.0


def _filled(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    engine = create_db_engine(f"sqlite:///{(data / 'dicomnode.db').resolve()}")
    migrate(engine)
    fill(engine, 300, per_study=10, days=30, now=NOW)  # 30 studies, one a day
    engine.dispose()
    return data


def _ids(data: Path, *args: str) -> list[int]:
    res = CliRunner().invoke(app, ["studies", "--json", "--data-dir", str(data), *args])
    assert res.exit_code == 0, res.output
    return [s["id"] for s in json.loads(res.stdout)]


def test_studies_pages_newest_first(tmp_path: Path) -> None:
    data = _filled(tmp_path)
    assert _ids(data) == list(range(30, 0, -1))  # default limit 100: all 30
    assert _ids(data, "--limit", "5") == [30, 29, 28, 27, 26]
    assert _ids(data, "--limit", "5", "--offset", "5") == [25, 24, 23, 22, 21]
    assert len(_ids(data, "--limit", "0")) == 30
    # study i (1-based) was received at NOW - 30 days + (i - 1) days
    since = dt.datetime.fromtimestamp(NOW - 30 * 86400 + 26.5 * 86400, dt.UTC)
    assert _ids(data, "--since", since.strftime("%Y-%m-%dT%H:%M:%S")) == [30, 29, 28]
    res = CliRunner().invoke(app, ["studies", "--data-dir", str(data), "--since", "soon"])
    assert res.exit_code == 2 and "--since" in res.output
