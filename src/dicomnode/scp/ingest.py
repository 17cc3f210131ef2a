"""Moved: the transport-neutral ingest is :mod:`dicomnode.storage.ingest` (C-STORE and
STOW-RS both call it). Re-exported here so the SCP's imports stay as they were."""

from dicomnode.storage.ingest import Ingestor, IngestResult

__all__ = ["IngestResult", "Ingestor"]
