"""STOW-RS out: store result objects on a DICOMweb server (PS3.18 10.5), with httpx.

One request per outbox item (``POST {url}/studies``, ``multipart/related;
type="application/dicom"``, ``Accept: application/dicom+json``). The answer maps to
the outbox's two failure kinds:

==========================  ===============================================
Answer                      Outcome
==========================  ===============================================
200, or 202 with the        delivered (a Warning Reason is logged)
instance referenced
202/409 listing the         :class:`DeliveryRefused` with its Failure Reason
instance as failed
408, 429, 5xx               :class:`SendError`: retried with the outbox backoff
network error, timeout      :class:`SendError`: retried
any other 4xx               :class:`DeliveryRefused` with the status and the
                            server's message (wrong credentials, bad URL)
==========================  ===============================================
"""

from __future__ import annotations

import json
import logging
import ssl
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from dicomnode.config import HttpCredentials
from dicomnode.errors import DeliveryRefused, SendError

__all__ = ["encode_multipart", "stow"]

log = logging.getLogger(__name__)

_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_SEQUENCE = "00081199"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"
_TRANSIENT = {408, 425, 429}


def encode_multipart(parts: Sequence[bytes]) -> tuple[bytes, str]:
    """A ``multipart/related`` body of DICOM files, and its Content-Type (RFC 2387)."""
    boundary = f"dicomnode-{uuid.uuid4().hex}"
    b = boundary.encode("ascii")
    chunks: list[bytes] = []
    for part in parts:
        chunks += [b"--", b, b"\r\nContent-Type: application/dicom\r\n\r\n", part, b"\r\n"]
    chunks += [b"--", b, b"--\r\n"]
    return (b"".join(chunks),
            f'multipart/related; type="application/dicom"; boundary="{boundary}"')


def _verify(tls_verify: bool, ca_file: Path | None) -> ssl.SSLContext | bool:
    if ca_file is not None:
        return ssl.create_default_context(cafile=str(ca_file))
    return tls_verify


def _server_message(response: httpx.Response) -> str:
    """The status and the start of the server's own explanation, on one line."""
    text = " ".join(response.text.split())[:200] if response.content else ""
    return f"{response.status_code} {response.reason_phrase}" + (f": {text}" if text else "")


def _values(item: dict[str, Any], tag: str) -> list[Any]:
    return list((item.get(tag) or {}).get("Value") or [])


def stow(url: str, parts: Sequence[bytes], sop_instance_uids: Sequence[str], *,
         credentials: HttpCredentials | None, tls_verify: bool = True,
         ca_file: Path | None = None, timeout_s: float = 30.0) -> None:
    """Store ``parts`` (PS3.10 files) on the server at ``url`` with one STOW-RS request.

    Parameters
    ----------
    url
        The DICOMweb base URL (``.../dicom-web``); the request goes to ``{url}/studies``.
    sop_instance_uids
        The instances' SOP Instance UIDs, to find them in the response.
    credentials
        Basic or bearer credentials (read from their files now), or None.

    Raises
    ------
    DeliveryRefused
        The server refused an instance or the request (see the module's table).
    SendError
        A transient failure: retry later.
    """
    body, content_type = encode_multipart(parts)
    headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}
    auth: httpx.Auth | None = None
    if credentials is not None:
        if credentials.scheme == "bearer":
            headers["Authorization"] = f"Bearer {credentials.secret()}"
        else:
            auth = httpx.BasicAuth(str(credentials.username), credentials.secret())
    target = url.rstrip("/") + "/studies"
    try:
        with httpx.Client(verify=_verify(tls_verify, ca_file), timeout=timeout_s,
                          follow_redirects=False) as client:
            response = client.post(target, content=body, headers=headers, auth=auth)
    except httpx.HTTPError as exc:
        raise SendError(f"STOW-RS to {target} failed: {exc.__class__.__name__}") from None
    status = response.status_code
    if status >= 500 or status in _TRANSIENT:
        raise SendError(f"STOW-RS to {target} answered {_server_message(response)}")
    if status not in (200, 202, 409):
        raise DeliveryRefused(f"STOW-RS to {target} refused: {_server_message(response)}")
    try:
        answer = response.json() if response.content else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        answer = {}
    if isinstance(answer, list):  # some servers answer the dataset in a JSON array
        answer = answer[0] if answer else {}
    failed = {
        str((_values(i, _REFERENCED_SOP_INSTANCE_UID) or [""])[0]):
            (_values(i, _FAILURE_REASON) or [0x0110])[0]
        for i in _values(answer, _FAILED_SOP_SEQUENCE) if isinstance(i, dict)
    }
    for uid in sop_instance_uids:
        if uid in failed:
            raise DeliveryRefused(
                f"STOW-RS to {target}: the instance failed with reason "
                f"0x{int(failed[uid]):04X} ({status})")
    if status == 409:
        raise DeliveryRefused(f"STOW-RS to {target} refused: {_server_message(response)}")
    for item in _values(answer, _REFERENCED_SOP_SEQUENCE):
        if isinstance(item, dict) and _values(item, _WARNING_REASON):
            log.warning("STOW-RS to %s: stored with warning 0x%04X", target,
                        int(_values(item, _WARNING_REASON)[0]))
