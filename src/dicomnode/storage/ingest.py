"""Durable ingest of one received object, whatever carried it: the work behind the
C-STORE handler (``scp.handlers``) and the STOW-RS endpoint (``api.stow``).

Order of operations, so that success is never answered for an object the node
does not hold and nothing half-written is ever indexed:

1. check the dataset's structure and read its UIDs in one pass (no pydicom parse,
   no pixel decoding);
2. pseudonymise the UIDs (the index and file names never see originals);
3. write file meta + dataset as received to ``spool/``, fsync, rename, fsync dir;
4. index it in one database transaction (study completion pushed out); if the same
   bytes were already stored under that SOP Instance UID, nothing changes and the
   new file is dropped (idempotent re-send);
5. only then return; a replaced earlier file is deleted after the commit.

The file is durable before the index row, so start-up indexes any spool file that
has no row (:meth:`Ingestor.reindex`): an acknowledged object survives even a lost
last database transaction (SQLite runs with ``synchronous=NORMAL``, see DESIGN.md).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from sqlalchemy import Connection

from dicomnode.dicom.header import encode_file_meta, scan_dataset
from dicomnode.dicom.pseudonym import Pseudonymizer
from dicomnode.errors import DatasetError, StorageError
from dicomnode.storage.index import ReceivedInstance, RecordOutcome, StoredInstance, StudyIndex
from dicomnode.storage.spool import FileStore

__all__ = ["IngestResult", "Ingestor"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestResult:
    """What happened to one object."""

    study_key: str
    sop_key: str
    duplicate: bool


class Ingestor:
    """Stores received objects durably and indexes them.

    Parameters
    ----------
    files
        The data directory's file store.
    index
        The study index.
    pseudonymizer
        Keys for the pseudonymous UIDs the index is keyed by.
    quiet_period_for
        Quiet period (s) for a calling AE title.
    max_wait_s
        Force-complete deadline after the first instance of a study version.
    deid_delay_s
        Each instance must be de-identified within this long of its receipt
        (``deid.max_delay_s``); the deadline is stored with it.
    on_recorded
        Called inside the index transaction of every new or replaced instance (the app
        enqueues its de-identification job there, so the two commit together).
    """

    def __init__(
        self,
        files: FileStore,
        index: StudyIndex,
        pseudonymizer: Pseudonymizer,
        *,
        quiet_period_for: Callable[[str | None], float],
        max_wait_s: float,
        deid_delay_s: float = 0.0,
        on_recorded: Callable[[Connection, RecordOutcome], None] | None = None,
    ) -> None:
        self.on_recorded = on_recorded
        self.deid_delay_s = deid_delay_s
        self.files = files
        self.index = index
        self.pseudonymizer = pseudonymizer
        self.quiet_period_for = quiet_period_for
        self.max_wait_s = max_wait_s

    def ingest(
        self,
        stream: bytes,
        transfer_syntax_uid: str,
        *,
        calling_ae: str | None,
        affected_sop_class_uid: str,
        affected_sop_instance_uid: str,
    ) -> IngestResult:
        """Store and index one dataset as received.

        Raises
        ------
        DatasetError
            The dataset is unusable; ``exc.status`` is the C-STORE status to answer.
        StorageError
            The file or the index could not be written (answer 0xA700).
        """
        ts = transfer_syntax_uid
        header = scan_dataset(stream, ts)
        # UIDs are NUL-padded to even length (PS3.5 9.1); some senders pad with a space.
        # The dataset's are read stripped of both; compare the request's the same way.
        affected_sop_instance_uid = affected_sop_instance_uid.strip(" \x00")
        affected_sop_class_uid = affected_sop_class_uid.strip(" \x00")
        if header.sop_instance_uid != affected_sop_instance_uid:
            raise DatasetError(
                "SOPInstanceUID differs from the request's Affected SOP Instance UID", status=0xC220
            )
        if header.sop_class_uid != affected_sop_class_uid:
            raise DatasetError(
                "SOPClassUID differs from the request's Affected SOP Class UID", status=0xA900
            )
        # A fresh name per write: a replacement never overwrites the file it replaces
        # before the index points at the new one.
        p = self.pseudonymizer
        study_key = p.uid(header.study_instance_uid)
        sop_key = p.uid(header.sop_instance_uid)
        relpath = f"spool/{study_key}/{sop_key}.{uuid.uuid4().hex[:10]}.dcm"
        head = encode_file_meta(header.sop_class_uid, header.sop_instance_uid, ts, calling_ae)
        size = self.files.write(relpath, [head, stream])

        def same_bytes(stored: StoredInstance) -> bool:
            if stored.state == "received" or stored.received_digest is None:
                return (
                    stored.size - stored.dataset_offset == len(stream)
                    and self.files.read_from(stored.path, stored.dataset_offset) == stream
                )
            # De-identified: the identified file may be gone; its keyed digest remains.
            return p.content_digest(stream) == stored.received_digest

        rec = ReceivedInstance(
            study_key=study_key,
            series_key=p.uid(header.series_instance_uid),
            sop_key=sop_key,
            sop_class_uid=header.sop_class_uid,
            transfer_syntax_uid=ts,
            modality=header.modality,
            series_number=header.series_number,
            path=relpath,
            size=size,
            dataset_offset=len(head),
            calling_ae=calling_ae,
        )
        try:
            outcome = self.index.record_instance(
                rec,
                quiet_period_s=self.quiet_period_for(calling_ae),
                max_wait_s=self.max_wait_s,
                is_same=same_bytes,
                on_recorded=self.on_recorded,
                deid_delay_s=self.deid_delay_s,
            )
        except StorageError:
            self.files.delete(relpath)
            raise
        if outcome.duplicate:
            # The same object again (a retry after a lost response): nothing changes.
            self.files.delete(relpath)
            log.debug("instance %s already stored with the same bytes", sop_key)
            return IngestResult(study_key, sop_key, duplicate=True)
        if outcome.replaced_paths:
            log.info("instance %s replaced by an object with other bytes", sop_key)
            for old in outcome.replaced_paths:
                try:
                    self.files.delete(old)
                except StorageError:
                    log.warning("could not delete replaced file %s", old)
        if outcome.reopened:
            log.info("study %s reopened (version %d)", study_key, outcome.study_version)
        return IngestResult(study_key, sop_key, duplicate=False)

    def reindex(self, relpath: str) -> bool:
        """Index a spool file that has no index row (start-up recovery).

        Returns False (and deletes the file) when its SOP Instance is already indexed
        under another file: the index is authoritative, and such a file was a
        replacement that never committed, hence never acknowledged.

        Raises
        ------
        DatasetError, StorageError
            The file is not a usable DICOM file, or the index write failed.
        """
        raw = self.files.read_from(relpath, 0)
        try:
            meta = dcmread(BytesIO(raw), stop_before_pixels=True, specific_tags=[]).file_meta
            offset = 132 + 12 + int(meta.FileMetaInformationGroupLength)
        except Exception as exc:
            raise DatasetError(
                f"{relpath}: no readable file meta ({exc.__class__.__name__})"
            ) from None
        stream = raw[offset:]
        header = scan_dataset(stream, str(meta.TransferSyntaxUID))
        calling_ae = str(meta.get("SourceApplicationEntityTitle", "")).strip() or None
        p = self.pseudonymizer
        rec = ReceivedInstance(
            study_key=p.uid(header.study_instance_uid),
            series_key=p.uid(header.series_instance_uid),
            sop_key=p.uid(header.sop_instance_uid),
            sop_class_uid=header.sop_class_uid,
            transfer_syntax_uid=str(meta.TransferSyntaxUID),
            modality=header.modality,
            series_number=header.series_number,
            path=relpath,
            size=len(raw),
            dataset_offset=offset,
            calling_ae=calling_ae,
        )
        outcome = self.index.record_instance(
            rec,
            quiet_period_s=self.quiet_period_for(calling_ae),
            max_wait_s=self.max_wait_s,
            is_same=lambda stored: True,
            on_recorded=self.on_recorded,
            deid_delay_s=self.deid_delay_s,
        )
        if outcome.duplicate:
            self.files.delete(relpath)
            return False
        return True
