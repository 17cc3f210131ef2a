"""STOW-RS in: ``POST /dicom-web/studies`` (PS3.18 10.5), the HTTP twin of C-STORE.

Peers authenticate with the credentials of their ``[peers.*].stow_credentials``
(basic or bearer) and are then what a calling AE title is over DIMSE: the allow-list
(``allow_store``) covers them, and their instances are filed under the peer's
``ae_title``. Each part goes through the same ingest as a C-STORE
(:class:`dicomnode.storage.ingest.Ingestor`: fsynced and indexed before the
answer), as soon as its closing delimiter arrives; each instance is its own unit,
as each C-STORE is.

Response status (the body is ``application/dicom+json``, or ``+xml`` when the
``Accept`` header prefers it, with ReferencedSOPSequence for the instances stored
and FailedSOPSequence with a Failure Reason for the others):

======  ===========================================================================
Status  Meaning
======  ===========================================================================
200     Every instance was stored (or already held with the same bytes).
202     Some were stored, others failed (see FailedSOPSequence).
400     The body is not a readable multipart body: no boundary, malformed part
        headers, or it ends before the closing delimiter (truncated). Parts that
        were complete before the error were stored and are listed; the cut part
        never is.
401     Credentials missing or not accepted (audited).
403     The peer is not allowed to store (``allow_store = false``).
409     No instance was stored (every part failed).
413     A part is larger than ``api.stow_max_part_bytes``.
415     The Content-Type is not ``multipart/related`` with type application/dicom.
503     The node does not take data now (``Retry-After`` says when to try again),
        or this process does not receive (no ingest).
======  ===========================================================================

Failure Reasons are the C-STORE statuses of ``scp/handlers.py`` (0xA700 out of
resources, 0xA900 SOP Class mismatch with the file meta, 0xC210 not decodable or
not a DICOM file, 0xC220 a required UID missing or differing from the file meta),
plus 0xC122 (transfer syntax not supported) and 0x0110 (processing failure).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydicom.uid import UID
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from dicomnode import metrics
from dicomnode.api.multipart import (
    MultipartError,
    MultipartReader,
    Part,
    PartTooLarge,
    parse_content_type,
)
from dicomnode.audit import audit
from dicomnode.config import NodeSettings, PeerSettings
from dicomnode.dicom.header import split_part10
from dicomnode.errors import DatasetError, NodeError, StorageError

__all__ = ["PeerAuthenticator", "StowOutcome", "stow_router"]

log = logging.getLogger(__name__)

_CHALLENGE = {"WWW-Authenticate": 'Basic realm="dicomnode-stow", Bearer'}
_JSON = "application/dicom+json"
_XML = "application/dicom+xml"
_NOT_SUPPORTED_TS = 0xC122
_PROCESSING_FAILURE = 0x0110
_OUT_OF_RESOURCES = 0xA700


@dataclass(frozen=True)
class _Peer:
    name: str
    settings: PeerSettings


class PeerAuthenticator:
    """Maps the credentials a STOW-RS client presents to the peer they belong to.

    Built once from ``[peers.*].stow_credentials`` (the secrets are read from their
    files then: restart the node to rotate them). Comparisons are constant-time.

    Raises
    ------
    ConfigError
        A credentials file cannot be read.
    """

    def __init__(self, settings: NodeSettings) -> None:
        self._basic: dict[str, tuple[bytes, _Peer]] = {}
        self._bearer: list[tuple[bytes, _Peer]] = []
        for name, peer in settings.peers.items():
            c = peer.stow_credentials
            if c is None:
                continue
            if c.scheme == "bearer":
                self._bearer.append((c.secret().encode(), _Peer(name, peer)))
            else:
                self._basic[str(c.username)] = (c.secret().encode(), _Peer(name, peer))

    def peer(self, authorization: str | None) -> _Peer | None:
        """The peer whose credentials ``authorization`` (the header) carries, or None."""
        if not authorization:
            return None
        scheme, _, value = authorization.partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer":
            found = None
            for token, peer in self._bearer:  # every one compared: no early exit (timing)
                if hmac.compare_digest(value.encode(), token):
                    found = peer
            return found
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None
            expected = self._basic.get(user)
            ok = hmac.compare_digest(password.encode(), expected[0] if expected else b"\0" * 32)
            return expected[1] if ok and expected else None
        return None


@dataclass
class StowOutcome:
    """What one request did: (SOP Class UID, SOP Instance UID[, reason]) per instance."""

    stored: list[tuple[str, str]]
    failed: list[tuple[str, str, int]]

    def status(self) -> int:
        if not self.failed:
            return 200
        return 202 if self.stored else 409


def _uid_element(value: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


def _json_body(o: StowOutcome) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if o.failed:
        body["00081198"] = {"vr": "SQ", "Value": [
            {"00081150": _uid_element(c), "00081155": _uid_element(i),
             "00081197": {"vr": "US", "Value": [reason]}} for c, i, reason in o.failed]}
    if o.stored:
        body["00081199"] = {"vr": "SQ", "Value": [
            {"00081150": _uid_element(c), "00081155": _uid_element(i)} for c, i in o.stored]}
    return body


def _xml_attr(tag: str, vr: str, keyword: str, value: str | int | None) -> str:
    inner = f'<Value number="1">{escape(str(value))}</Value>' if value not in (None, "") else ""
    return f'<DicomAttribute tag="{tag}" vr="{vr}" keyword="{keyword}">{inner}</DicomAttribute>'


def _xml_body(o: StowOutcome) -> str:
    """The PS3.19 Native DICOM Model of the response."""
    def items(rows: list[tuple[Any, ...]]) -> str:
        out = []
        for n, row in enumerate(rows, start=1):
            attrs = [_xml_attr("00081150", "UI", "ReferencedSOPClassUID", row[0]),
                     _xml_attr("00081155", "UI", "ReferencedSOPInstanceUID", row[1])]
            if len(row) > 2:
                attrs.append(_xml_attr("00081197", "US", "FailureReason", row[2]))
            out.append(f'<Item number="{n}">{"".join(attrs)}</Item>')
        return "".join(out)

    parts = ['<?xml version="1.0" encoding="UTF-8"?>',
             '<NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">']
    if o.failed:
        parts.append('<DicomAttribute tag="00081198" vr="SQ" keyword="FailedSOPSequence">'
                     f"{items(o.failed)}</DicomAttribute>")
    if o.stored:
        parts.append('<DicomAttribute tag="00081199" vr="SQ" keyword="ReferencedSOPSequence">'
                     f"{items(o.stored)}</DicomAttribute>")
    parts.append("</NativeDicomModel>")
    return "".join(parts)


def _answer(o: StowOutcome, status: int, accept: str,
            headers: dict[str, str] | None = None) -> Response:
    wants_xml = _XML in accept and _JSON not in accept
    if wants_xml:
        return Response(_xml_body(o), status_code=status, media_type=_XML, headers=headers)
    return JSONResponse(_json_body(o), status_code=status, media_type=_JSON, headers=headers)


def _problem(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def ingest_part(ingestor: Any, part: Part, calling_ae: str | None
                ) -> tuple[str, str, int | None]:
    """Store one part: (SOP Class UID, SOP Instance UID, failure reason or None).

    The UIDs are those of the File Meta ("" when it cannot be read); they go back to
    the peer that sent them, never to a log.
    """
    if part.content_type not in ("application/dicom", ""):
        return "", "", 0xC210
    try:
        meta = split_part10(part.content)
    except DatasetError as exc:
        return "", "", exc.status
    cls, inst = meta.media_storage_sop_class_uid, meta.media_storage_sop_instance_uid
    if not UID(meta.transfer_syntax_uid).is_transfer_syntax:
        return cls, inst, _NOT_SUPPORTED_TS
    try:
        ingestor.ingest(part.content[meta.dataset_offset:], meta.transfer_syntax_uid,
                        calling_ae=calling_ae, affected_sop_class_uid=cls,
                        affected_sop_instance_uid=inst)
    except DatasetError as exc:
        return cls, inst, exc.status
    except StorageError as exc:
        log.error("STOW-RS instance not stored (0xA700): %s", exc)
        return cls, inst, _OUT_OF_RESOURCES
    except NodeError as exc:
        log.error("STOW-RS instance not stored (0x0110): %s", exc)
        return cls, inst, _PROCESSING_FAILURE
    except Exception:  # a bug of ours: answer for this instance, keep the request going
        log.exception("STOW-RS instance not stored (0x0110, unexpected error)")
        return cls, inst, _PROCESSING_FAILURE
    return cls, inst, None


def stow_router(authenticator: PeerAuthenticator) -> APIRouter:
    """The STOW-RS route (see the module's status table)."""
    router = APIRouter(tags=["dicomweb"])

    @router.post(
        "/dicom-web/studies",
        summary="Store instances (STOW-RS)",
        response_class=Response,
        # PS3.18 defines it and peers (not operators) call it: not in the operator schema
        include_in_schema=False,
        responses={
            200: {"description": "Every instance stored", "content": {_JSON: {}, _XML: {}}},
            202: {"description": "Some instances stored, some failed"},
            400: {"description": "Not a readable multipart body"},
            401: {"description": "Credentials missing or not accepted"},
            403: {"description": "The peer may not store"},
            409: {"description": "No instance stored"},
            413: {"description": "A part is too large"},
            415: {"description": "Not multipart/related; type=application/dicom"},
            503: {"description": "Not taking data now (see Retry-After)"},
        },
    )
    async def store_instances(request: Request) -> Response:
        svc = request.app.state.services
        address = request.client.host if request.client else None
        peer = authenticator.peer(request.headers.get("authorization"))
        if peer is None:
            audit("api_authentication_failed", user="stow", address=address, outcome=4,
                  outcome_description="STOW-RS credentials missing or not accepted")
            return _problem(401, "credentials required", _CHALLENGE)
        if not peer.settings.allow_store:
            return _problem(403, f"peer {peer.name} may not store (allow_store = false)")
        ingestor = svc.ingestor
        if ingestor is None:
            return _problem(503, "this process does not receive instances")
        retry_after = admission_retry_after(svc.ingest_gate)
        if retry_after is not None:
            return _problem(503, "the node does not take data now",
                            {"Retry-After": str(max(1, round(retry_after)))})
        media, params = parse_content_type(request.headers.get("content-type", ""))
        if media != "multipart/related" or params.get("type", "application/dicom").lower() \
                != "application/dicom":
            return _problem(415, 'the body must be multipart/related; type="application/dicom"')
        if "boundary" not in params:
            return _problem(400, "the Content-Type has no boundary")
        accept = request.headers.get("accept", _JSON)
        outcome = StowOutcome([], [])
        # Parts are stored one at a time, in order, in a worker thread, while the next
        # ones are read from the socket (the fsync of one overlaps the transfer of the
        # next); at most a few complete parts wait in memory.
        parts: asyncio.Queue[Part | None] = asyncio.Queue(maxsize=4)

        async def store_parts() -> None:
            while (part := await parts.get()) is not None:
                cls, inst, reason = await run_in_threadpool(
                    ingest_part, ingestor, part, peer.settings.ae_title)
                if reason is None:
                    outcome.stored.append((cls, inst))
                    metrics.INSTANCES_RECEIVED.inc()
                else:
                    outcome.failed.append((cls, inst, reason))
                    metrics.INSTANCES_REJECTED.labels(metrics.dimse_status(reason)).inc()

        storing = asyncio.create_task(store_parts())
        try:
            try:
                reader = MultipartReader(params["boundary"],
                                         svc.settings.api.stow_max_part_bytes)
                async for chunk in request.stream():
                    for part in reader.feed(chunk):
                        await parts.put(part)
                reader.close()
            finally:
                await parts.put(None)
                await storing  # every complete part is stored before any answer
        except PartTooLarge as exc:
            _audit(peer, address, outcome, str(exc))
            return _answer(outcome, 413, accept)
        except MultipartError as exc:
            log.warning("STOW-RS from %s: %s (%d stored before)", peer.name, exc,
                        len(outcome.stored))
            _audit(peer, address, outcome, str(exc))
            return _answer(outcome, 400, accept)
        except ClientDisconnect:
            log.warning("STOW-RS from %s: the client left mid-body (%d instance(s) stored "
                        "before)", peer.name, len(outcome.stored))
            _audit(peer, address, outcome, "client disconnected before the end of the body")
            return Response(status_code=400)
        _audit(peer, address, outcome, None)
        log.info("STOW-RS from %s: %d stored, %d failed", peer.name, len(outcome.stored),
                 len(outcome.failed))
        return _answer(outcome, outcome.status(), accept)

    return router


def admission_retry_after(gate: Callable[[], float | None] | None) -> float | None:
    """Seconds a client should wait before storing again, or None to go ahead.

    The node's admission check for HTTP ingest. ``gate`` is wired by the app: the disk
    watermark (``storage.diskguard``), so STOW-RS and C-STORE refuse at the same one.
    """
    return gate() if gate is not None else None


def _audit(peer: _Peer, address: str | None, o: StowOutcome, error: str | None) -> None:
    audit("stow_received", user=peer.name, ae_title=peer.settings.ae_title, address=address,
          stored=len(o.stored), failed=len(o.failed),
          outcome=0 if error is None and not o.failed else 4, outcome_description=error)
