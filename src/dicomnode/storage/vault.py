"""The identity vault: the only place the node keeps who a pseudonym belongs to.

Rows live in the node's database, encrypted at rest with AES-GCM (``cryptography``)
under the vault key, which is not the pseudonym secret: a leaked database holds
ciphertext, and a leaked pseudonym secret cannot decrypt the vault. Each row's
associated data binds it to its pseudonym, so rows cannot be swapped.

Only re-identification and the operator command read it, through
:meth:`Vault.reader`, which records every read (actor, purpose, subject, count)
in ``vault_access``. Writes (from de-identification) are not reads.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Connection, select, text

from dicomnode import metrics
from dicomnode.audit import audit
from dicomnode.dicom.deid import IdentityRecord, UIDMapEntry
from dicomnode.errors import VaultError
from dicomnode.storage.models import VaultAccess, VaultIdentity, VaultUID

__all__ = ["Vault", "VaultReader"]

_SQL_PUT_UID = text(
    "INSERT INTO vault_uid (pseudonym, nonce, ciphertext, created_at)"
    " VALUES (:pseudonym, :nonce, :ciphertext, :created_at)"
    " ON CONFLICT (pseudonym) DO NOTHING"
)
_SQL_PUT_IDENTITY = text(
    "INSERT INTO vault_identity (study_key, patient_key, nonce, ciphertext, updated_at)"
    " VALUES (:study_key, :patient_key, :nonce, :ciphertext, :updated_at)"
    " ON CONFLICT (study_key) DO UPDATE SET patient_key = excluded.patient_key,"
    " nonce = excluded.nonce, ciphertext = excluded.ciphertext, updated_at = excluded.updated_at"
)


class Vault:
    """Encrypted reverse map (pseudonymous UID -> original) and study identities.

    Parameters
    ----------
    engine
        The node's database engine.
    key
        32-byte AES-256 key (``keys/vault.key``), separate from the pseudonym secret.
    """

    def __init__(self, engine: Any, key: bytes) -> None:
        if len(key) != 32:
            raise VaultError(f"vault key must be 32 bytes, got {len(key)}")
        self.engine = engine
        self._aead = AESGCM(key)
        self._known: set[str] = set()  # pseudonyms this process already stored

    # -- writing (de-identification) -----------------------------------------------------

    def _seal(self, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
        nonce = os.urandom(12)
        return nonce, self._aead.encrypt(nonce, plaintext, aad)

    def put(
        self,
        conn: Connection,
        uid_map: Iterable[UIDMapEntry],
        identity: IdentityRecord,
        study_key: str,
    ) -> None:
        """Store UID pairs (first write wins: pairs are deterministic) and the study identity.

        Runs in the caller's transaction ``conn`` so that the vault rows and the
        de-identified instance's index row commit together.
        """
        now = time.time()
        rows = []
        for entry in uid_map:
            if entry.pseudonym in self._known:
                continue
            nonce, ct = self._seal(
                entry.original.encode("ascii"), b"uid|" + entry.pseudonym.encode()
            )
            rows.append(
                {"pseudonym": entry.pseudonym, "nonce": nonce, "ciphertext": ct, "created_at": now}
            )
        if rows:
            conn.execute(_SQL_PUT_UID, rows)
        nonce, ct = self._seal(
            json.dumps(identity.to_json(), sort_keys=True).encode(),
            b"identity|" + study_key.encode(),
        )
        conn.execute(
            _SQL_PUT_IDENTITY,
            {
                "study_key": study_key,
                "patient_key": identity.patient_pseudonym,
                "nonce": nonce,
                "ciphertext": ct,
                "updated_at": now,
            },
        )
        self._known.update(r["pseudonym"] for r in rows)

    # -- reading (re-identification, operators) -------------------------------------------

    @contextmanager
    def reader(self, actor: str, purpose: str, subject: str) -> Iterator[VaultReader]:
        """Open an audited read session; one ``vault_access`` row is written at its end.

        Parameters
        ----------
        actor
            Who reads: ``"reidentify"``, ``"operator:<name>"``...
        purpose
            Why: ``"result:<kind>"``, ``"vault show"``...
        subject
            The pseudonym the read is about (study key, patient key).
        """
        r = VaultReader(self)
        try:
            yield r
        finally:
            with self.engine.begin() as c:
                c.execute(
                    VaultAccess.__table__.insert().values(
                        at=time.time(),
                        actor=actor[:64],
                        purpose=purpose[:64],
                        subject=subject[:64],
                        reads=r.reads,
                    )
                )
            metrics.VAULT_READS.labels(actor.split(":", 1)[0]).inc()
            audit("vault_read", user=actor, subject=subject, purpose=purpose, reads=r.reads)

    def _open_uid(self, row: Any) -> str:
        try:
            return self._aead.decrypt(
                row.nonce, row.ciphertext, b"uid|" + row.pseudonym.encode()
            ).decode()
        except InvalidTag:
            raise VaultError(
                f"vault row for {row.pseudonym} does not decrypt (wrong key?)"
            ) from None

    def accesses(self, limit: int = 100) -> list[dict[str, Any]]:
        """The latest vault reads, newest first."""
        with self.engine.connect() as c:
            rows = (
                c.execute(select(VaultAccess).order_by(VaultAccess.id.desc()).limit(limit))
                .mappings()
                .all()
            )
        return [dict(r) for r in rows]


@dataclass
class VaultReader:
    """Lookups inside one audited :meth:`Vault.reader` session."""

    vault: Vault
    reads: int = 0
    _cache: dict[str, str | None] = field(default_factory=dict)

    def original_uid(self, pseudonym: str) -> str | None:
        """The original UID behind a pseudonymous one, or None if the vault has no row."""
        if pseudonym in self._cache:
            return self._cache[pseudonym]
        with self.vault.engine.connect() as c:
            row = c.execute(
                select(VaultUID.pseudonym, VaultUID.nonce, VaultUID.ciphertext).where(
                    VaultUID.pseudonym == pseudonym
                )
            ).first()
        self.reads += 1
        value = self.vault._open_uid(row) if row else None
        self._cache[pseudonym] = value
        return value

    def is_pseudonym(self, uid: str) -> bool:
        """Whether ``uid`` is one of the node's pseudonyms (has a vault row)."""
        return self.original_uid(uid) is not None

    def identity(self, study_key: str) -> IdentityRecord | None:
        """The original Patient/Study values of a study, or None."""
        with self.vault.engine.connect() as c:
            row = c.execute(
                select(VaultIdentity.nonce, VaultIdentity.ciphertext).where(
                    VaultIdentity.study_key == study_key
                )
            ).first()
        self.reads += 1
        if row is None:
            return None
        try:
            plain = self.vault._aead.decrypt(
                row.nonce, row.ciphertext, b"identity|" + study_key.encode()
            )
        except InvalidTag:
            raise VaultError(f"identity of {study_key} does not decrypt (wrong key?)") from None
        return IdentityRecord.from_json(json.loads(plain))

    def studies_of_patient(self, patient_key: str) -> list[str]:
        """Study keys of a pseudonymous patient."""
        with self.vault.engine.connect() as c:
            keys = list(
                c.execute(
                    select(VaultIdentity.study_key).where(VaultIdentity.patient_key == patient_key)
                ).scalars()
            )
        self.reads += 1
        return keys
