"""ModelRegistry: model versions in the database, their packages under ``data_dir/models``.

A version's files are copied to ``models/<name>/<version>/`` when it is added and
never overwritten afterwards (adding the same name and version again is refused
unless the sha256 matches, which is then a no-op). At most one version per name
is ``active``; inference picks the active version when a job starts, so a
promotion never changes a model under a running job.
"""

from __future__ import annotations

import getpass
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.audit import audit
from dicomnode.errors import ModelError
from dicomnode.modelpkg.format1 import read_model_package
from dicomnode.storage.models import ModelVersion

__all__ = ["ModelRegistry", "RegisteredModel"]


@dataclass(frozen=True)
class RegisteredModel:
    """A registry row as a value."""

    name: str
    version: str
    task: str
    sha256: str
    path: Path
    status: str
    created_at: float
    created_by: str
    activated_at: float | None
    reason: str | None
    metrics: dict[str, Any]
    card: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["path"] = str(self.path)
        return d


class ModelRegistry:
    """Model versions of one node.

    Parameters
    ----------
    sessions
        The node's database sessions.
    root
        The data directory (packages live in ``root/models``).
    """

    def __init__(self, sessions: sessionmaker[Session], root: Path,
                 validator: Callable[[Path], list[dict[str, Any]]] | None = None) -> None:
        self.sessions = sessions
        self.root = root
        self.validator = validator
        """Runs a package's golden cases (``inference.golden``, wired by the composition
        root): raises ModelError below a case's Dice, returns the results."""

    def _value(self, row: ModelVersion) -> RegisteredModel:
        return RegisteredModel(
            name=row.name,
            version=row.version,
            task=row.task,
            sha256=row.sha256,
            path=self.root / row.path,
            status=row.status,
            created_at=row.created_at,
            created_by=row.created_by,
            activated_at=row.activated_at,
            reason=row.reason,
            metrics=dict(row.metrics or {}),
            card=dict(row.card or {}),
        )

    def add(
        self,
        package: Path,
        *,
        created_by: str | None = None,
        status: str = "candidate",
        metrics: dict[str, Any] | None = None,
        card: dict[str, Any] | None = None,
    ) -> RegisteredModel:
        """Copy a model package (directory or archive) in and record it.

        Raises
        ------
        ModelLoadError
            The package is invalid (checked as far as possible without a session).
        ModelError
            The same name and version exist with other contents.
        """
        pkg = read_model_package(package)
        with self.sessions() as s:
            existing = s.execute(
                select(ModelVersion).where(
                    ModelVersion.name == pkg.name, ModelVersion.version == pkg.version
                )
            ).scalar()
        if existing is not None:
            if existing.sha256 != pkg.sha256:
                raise ModelError(
                    f"{pkg.name} {pkg.version} is already registered with another model.onnx "
                    "(versions are immutable: give the new one another version)"
                )
            return self._value(existing)
        rel = Path("models") / pkg.name / pkg.version
        dest = self.root / rel
        if dest.exists():
            shutil.rmtree(dest)  # a copy left by a crash before the row was committed
        dest.parent.mkdir(parents=True, exist_ok=True)
        if Path(package).is_dir():
            shutil.copytree(package, dest)
        else:
            dest.mkdir()
            shutil.copy2(package, dest / Path(package).name)
        dest_pkg = dest if Path(package).is_dir() else dest / Path(package).name
        metrics = dict(metrics or {})
        reason = None
        if self.validator is not None:
            try:
                golden = self.validator(dest_pkg)
            except ModelError as exc:
                # kept for the record, never activated (activate runs the cases again)
                status, reason = "rejected", str(exc)
            else:
                if golden:
                    metrics["golden"] = golden
        row = ModelVersion(
            name=pkg.name,
            version=pkg.version,
            task=pkg.task,
            sha256=pkg.sha256,
            path=str(dest_pkg.relative_to(self.root)),
            status=status,
            created_at=time.time(),
            created_by=created_by or getpass.getuser(),
            metrics=metrics,
            card=card or {},
            reason=reason,
        )
        with self.sessions.begin() as s:
            s.add(row)
        return self._value(row)

    def activate(self, name: str, version: str, reason: str | None = None) -> RegisteredModel:
        """Make ``version`` the active one of ``name`` (the previous active is retired).

        Raises
        ------
        ModelError
            No such version, or its golden cases fail (the message gives the Dice).
        """
        if self.validator is not None:
            found = self.get(name, version)
            if found is None:
                raise ModelError(f"no model {name} version {version}")
            try:
                self.validator(found.path)
            except ModelError as exc:
                self.set_status(name, version, "rejected", str(exc))
                raise ModelError(f"{name} {version} not activated: {exc}") from None
        now = time.time()
        with self.sessions.begin() as s:
            row = s.execute(
                select(ModelVersion).where(
                    ModelVersion.name == name, ModelVersion.version == version
                )
            ).scalar()
            if row is None:
                raise ModelError(f"no model {name} version {version}")
            s.execute(
                update(ModelVersion)
                .where(
                    ModelVersion.name == name,
                    ModelVersion.status == "active",
                    ModelVersion.id != row.id,
                )
                .values(status="retired")
            )
            row.status, row.activated_at = "active", now
            if reason:
                row.reason = reason
            s.flush()
            value = self._value(row)
        audit("model_promoted", model=name, version=version, reason=reason)  # once committed
        return value

    def set_status(self, name: str, version: str, status: str, reason: str) -> None:
        """Record a non-active status (``rejected``, ``candidate``) with its reason."""
        with self.sessions.begin() as s:
            s.execute(
                update(ModelVersion)
                .where(ModelVersion.name == name, ModelVersion.version == version)
                .values(status=status, reason=reason)
            )

    def active(self, name: str) -> RegisteredModel | None:
        """The active version of ``name``, or None."""
        with self.sessions() as s:
            row = s.execute(
                select(ModelVersion).where(
                    ModelVersion.name == name, ModelVersion.status == "active"
                )
            ).scalar()
            return self._value(row) if row is not None else None

    def get(self, name: str, version: str) -> RegisteredModel | None:
        with self.sessions() as s:
            row = s.execute(
                select(ModelVersion).where(
                    ModelVersion.name == name, ModelVersion.version == version
                )
            ).scalar()
            return self._value(row) if row is not None else None

    def list(self, name: str | None = None) -> list[RegisteredModel]:
        """Every version (of ``name``), oldest first."""
        q = select(ModelVersion).order_by(ModelVersion.name, ModelVersion.created_at)
        if name is not None:
            q = q.where(ModelVersion.name == name)
        with self.sessions() as s:
            return [self._value(r) for r in s.execute(q).scalars()]

    def rollback(self, name: str, reason: str = "rollback") -> RegisteredModel:
        """Re-activate the version that was active before the current one.

        Raises
        ------
        ModelError
            No earlier version was ever active.
        """
        with self.sessions() as s:
            rows = list(
                s.execute(
                    select(ModelVersion)
                    .where(ModelVersion.name == name, ModelVersion.activated_at.is_not(None))
                    .order_by(ModelVersion.activated_at.desc())
                ).scalars()
            )
        if len(rows) < 2:
            raise ModelError(f"{name}: no earlier active version to roll back to")
        current, previous = rows[0], rows[1]
        self.set_status(current.name, current.version, "retired", reason)
        return self.activate(previous.name, previous.version, reason)
