"""The audit trail: one JSON line per security-relevant event, in DICOM PS3.15 Annex A terms.

:func:`audit` writes through the dedicated logger ``dicomnode.audit``
(:func:`dicomnode.logsetup.configure_logging` sends it to its own file). Each
line is one JSON object using the field names of the DICOM audit message schema
(PS3.15 A.5.1), flattened to one level where the XML nests:

``event``
    Our name of the event (``association_accepted``...), for grep and alerting.
``EventDateTime``
    UTC, ISO 8601 with milliseconds.
``EventID`` / ``EventTypeCode``
    Coded (``{"csd-code", "codeSystemName": "DCM", "originalText"}``), from PS3.16 CID 400/401.
``EventActionCode``
    C(reate), R(ead), U(pdate), D(elete), E(xecute).
``EventOutcomeIndicator``
    0 success, 4 minor failure, 8 serious failure, 12 major failure;
    ``EventOutcomeDescription`` says why when it is not 0.
``ActiveParticipant``
    Who acted: ``UserID`` (an AE title, ``dicomnode``, ``operator:<name>``,
    ``api:<user>``), ``AlternativeUserID`` (``AETITLES=<ae>`` for DICOM
    applications), ``UserIsRequestor``, ``RoleIDCode`` (source / destination),
    ``NetworkAccessPointID`` with ``NetworkAccessPointTypeCode`` (2: IP address).
``AuditSourceIdentification``
    This machine (``AuditSourceID``: the host name; type 4, application server).
``ParticipantObjectIdentification``
    What it was about, by **pseudonymous** ID only: a study key (type 2, role 3,
    ID type 110180 Study Instance UID), a patient key (type 1, role 1, ID type 2
    Patient Number), the pseudonym a vault read was about (type 1, role 1), a model
    version, a configuration digest.
    ``ParticipantObjectDataLifeCycle`` 7 marks de-identification.
``Detail``
    Our additional fields (counts, reasons written by the node).

Events and where they are emitted:

=========================  =================================================  ==================
event                      EventID / EventTypeCode, action                    emitted in
=========================  =================================================  ==================
association_accepted       110114 User Authentication / 110122 Login, E      scp/handlers.py
association_rejected       same, outcome 4                                    scp/handlers.py
connection_dropped         110113 Security Alert / 110126 Node Auth., E, 4    scp/gate.py
tls_handshake_failed       same                                               scp/gate.py
deidentified               110103 DICOM Instances Accessed, C, lifecycle 7    pipeline/deid.py
vault_read                 110110 Patient Record, R                           storage/vault.py
reidentified               110103 DICOM Instances Accessed, U                 pipeline/results.py
result_sent                110104 DICOM Instances Transferred, C              pipeline/results.py
model_promoted             110113 Security Alert / 110131 Software Config, U  storage/registry.py
config_loaded              110113 Security Alert / 110131 Software Config, E  the CLI (serve)
application_start / _stop  110100 Application Activity / 110120 / 110121, E   the node (start/stop)
api_authentication_failed  110114 User Authentication / 110122 Login, E, 4    api/auth.py
operator_action            110113 Security Alert / 110132 Restricted Fn, E    api (POST routes)
disk_watermark             110113 Security Alert, E                           storage/diskguard.py
retention_removed          110103 DICOM Instances Accessed, D                 storage/retention.py
patient_deleted            110110 Patient Record, D                           storage/retention.py
=========================  =================================================  ==================

Callers pass pseudonymous keys, AE titles, peer addresses and texts the node
wrote; never a value read from a dataset. ``audit`` never raises for a bad field
(an unknown event is recorded as such): auditing must not break the work it records.

This module is a leaf: it imports nothing from the package.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import socket
from collections.abc import Mapping
from typing import Any

__all__ = ["AUDIT_LOGGER", "EVENTS", "audit", "audit_message"]

AUDIT_LOGGER = "dicomnode.audit"
"""Name of the logger every audit line goes through."""

_log = logging.getLogger(AUDIT_LOGGER)


def _code(value: str, meaning: str, system: str = "DCM") -> dict[str, str]:
    return {"csd-code": value, "codeSystemName": system, "originalText": meaning}


_APPLICATION_ACTIVITY = _code("110100", "Application Activity")
_INSTANCES_ACCESSED = _code("110103", "DICOM Instances Accessed")
_INSTANCES_TRANSFERRED = _code("110104", "DICOM Instances Transferred")
_PATIENT_RECORD = _code("110110", "Patient Record")
_SECURITY_ALERT = _code("110113", "Security Alert")
_USER_AUTHENTICATION = _code("110114", "User Authentication")
_LOGIN = _code("110122", "Login")

EVENTS: dict[str, tuple[dict[str, str], str, dict[str, str] | None]] = {
    "association_accepted": (_USER_AUTHENTICATION, "E", _LOGIN),
    "association_rejected": (_USER_AUTHENTICATION, "E", _LOGIN),
    # Connections closed before associating (rate-limited per source address, with counts)
    # and failed TLS handshakes: PS3.15 A.5.3.11 Security Alert, Node Authentication.
    "connection_dropped": (_SECURITY_ALERT, "E", _code("110126", "Node Authentication")),
    "tls_handshake_failed": (_SECURITY_ALERT, "E", _code("110126", "Node Authentication")),
    "deidentified": (_INSTANCES_ACCESSED, "C", None),
    "vault_read": (_PATIENT_RECORD, "R", None),
    "reidentified": (_INSTANCES_ACCESSED, "U", None),
    "result_sent": (_INSTANCES_TRANSFERRED, "C", None),
    "stow_received": (_INSTANCES_TRANSFERRED, "C", None),
    "model_promoted": (_SECURITY_ALERT, "U", _code("110131", "Software Configuration")),
    "config_loaded": (_SECURITY_ALERT, "E", _code("110131", "Software Configuration")),
    "application_start": (_APPLICATION_ACTIVITY, "E", _code("110120", "Application Start")),
    "application_stop": (_APPLICATION_ACTIVITY, "E", _code("110121", "Application Stop")),
    "api_authentication_failed": (_USER_AUTHENTICATION, "E", _LOGIN),
    "operator_action": (_SECURITY_ALERT, "E", _code("110132", "Use of Restricted Function")),
    "spool_expired": (_INSTANCES_ACCESSED, "D", None),
    "disk_watermark": (_SECURITY_ALERT, "E", None),
    "retention_removed": (_INSTANCES_ACCESSED, "D", None),
    "patient_deleted": (_PATIENT_RECORD, "D", None),
}
"""event name -> (EventID, EventActionCode, EventTypeCode or None)."""

_SOURCE = _code("110153", "Source Role ID")
_DESTINATION = _code("110152", "Destination Role ID")

# Fields that become the structured parts of the message; the rest go to Detail.
_PARTICIPANT_KEYS = {"user", "ae_title", "address", "requestor", "peer_ae", "peer_address",
                     "peer_name"}
_OBJECT_KEYS = {"study_key", "patient_key", "subject", "model", "version", "config_digest",
                "lifecycle", "sop_class_uid"}


def _participant(user: str, *, ae: str | None, address: str | None, requestor: bool,
                 role: dict[str, str] | None = None) -> dict[str, Any]:
    p: dict[str, Any] = {"UserID": user, "UserIsRequestor": requestor}
    if ae:
        p["AlternativeUserID"] = f"AETITLES={ae}"
    if role is not None:
        p["RoleIDCode"] = role
    if address:
        p["NetworkAccessPointID"] = address
        p["NetworkAccessPointTypeCode"] = "2"
    return p


def _objects(fields: Mapping[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if fields.get("study_key"):
        o: dict[str, Any] = {
            "ParticipantObjectID": str(fields["study_key"]),
            "ParticipantObjectTypeCode": 2,
            "ParticipantObjectTypeCodeRole": 3,
            "ParticipantObjectIDTypeCode": _code("110180", "Study Instance UID"),
        }
        if fields.get("lifecycle") is not None:
            o["ParticipantObjectDataLifeCycle"] = int(fields["lifecycle"])
        if fields.get("sop_class_uid"):
            o["ParticipantObjectDescription"] = {"SOPClass": {"UID": str(fields["sop_class_uid"])}}
        out.append(o)
    if fields.get("patient_key"):
        out.append({
            "ParticipantObjectID": str(fields["patient_key"]),
            "ParticipantObjectTypeCode": 1,
            "ParticipantObjectTypeCodeRole": 1,
            "ParticipantObjectIDTypeCode": _code("2", "Patient Number", "RFC-3881"),
        })
    if fields.get("subject"):
        # a vault lookup: whichever pseudonym was asked about, the record read is a patient's
        out.append({
            "ParticipantObjectID": str(fields["subject"]),
            "ParticipantObjectTypeCode": 1,
            "ParticipantObjectTypeCodeRole": 1,
            "ParticipantObjectIDTypeCode": _code("pseudonym", "Pseudonym (study key, patient "
                                                 "key or UID)", "dicomnode"),
        })
    if fields.get("model"):
        out.append({
            "ParticipantObjectID": f"{fields['model']} {fields.get('version') or ''}".strip(),
            "ParticipantObjectTypeCode": 2,
            "ParticipantObjectTypeCodeRole": 4,
            "ParticipantObjectIDTypeCode": _code("model", "Model name and version",
                                                 "dicomnode"),
        })
    if fields.get("config_digest"):
        out.append({
            "ParticipantObjectID": str(fields["config_digest"]),
            "ParticipantObjectTypeCode": 2,
            "ParticipantObjectTypeCodeRole": 4,
            "ParticipantObjectIDTypeCode": _code("config", "SHA-256 of the effective "
                                                 "configuration, secrets excluded", "dicomnode"),
        })
    return out


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    return str(value)


def audit_message(event: str, **fields: Any) -> dict[str, Any]:
    """The audit message of one event as a JSON-ready dict (what :func:`audit` writes).

    Parameters
    ----------
    event
        A key of :data:`EVENTS`; another name is recorded with EventID ``unknown``.
    **fields
        ``outcome`` (0/4/8/12, default 0) and ``outcome_description``;
        the acting participant: ``user`` (default ``dicomnode``), ``ae_title``,
        ``address``, ``requestor`` (default True);
        a second (peer) participant: ``peer_ae``, ``peer_address``, ``peer_name``
        (the node is then the source, the peer the destination);
        the objects: ``study_key``, ``patient_key``, ``subject`` (pseudonyms only),
        ``lifecycle`` (ParticipantObjectDataLifeCycle), ``sop_class_uid``,
        ``model`` and ``version``, ``config_digest``;
        anything else goes to ``Detail``.
    """
    event_id, action, type_code = EVENTS.get(
        event, (_code("unknown", event, "dicomnode"), "E", None))
    now = _dt.datetime.now(_dt.UTC)
    outcome = int(fields.get("outcome", 0))
    msg: dict[str, Any] = {
        "event": event,
        "EventID": event_id,
        "EventActionCode": action,
        "EventDateTime": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "EventOutcomeIndicator": outcome,
    }
    if fields.get("outcome_description"):
        msg["EventOutcomeDescription"] = str(fields["outcome_description"])
    if type_code is not None:
        msg["EventTypeCode"] = [type_code]
    peer = fields.get("peer_ae") or fields.get("peer_address") or fields.get("peer_name")
    participants = [_participant(
        str(fields.get("user") or "dicomnode"), ae=fields.get("ae_title"),
        address=fields.get("address"), requestor=bool(fields.get("requestor", True)),
        role=_SOURCE if peer else None,
    )]
    if peer:
        participants.append(_participant(
            str(fields.get("peer_name") or fields.get("peer_ae") or fields.get("peer_address")),
            ae=fields.get("peer_ae"), address=fields.get("peer_address"), requestor=False,
            role=_DESTINATION,
        ))
    msg["ActiveParticipant"] = participants
    msg["AuditSourceIdentification"] = {"AuditSourceID": socket.gethostname(),
                                        "AuditSourceTypeCode": "4"}
    objects = _objects(fields)
    if objects:
        msg["ParticipantObjectIdentification"] = objects
    detail = {k: _jsonable(v) for k, v in fields.items()
              if k not in _PARTICIPANT_KEYS | _OBJECT_KEYS | {"outcome", "outcome_description"}}
    if detail:
        msg["Detail"] = detail
    return msg


def audit(event: str, **fields: Any) -> None:
    """Write one audit line (see the module docstring for events and fields).

    Never raises: a failure to build the message is itself logged (as an audit
    line naming the event) rather than breaking the operation being audited.
    """
    try:
        msg = audit_message(event, **fields)
    except Exception as exc:  # a bad field: still leave a trace of the event
        msg = {"event": event, "EventOutcomeIndicator": 8,
               "EventOutcomeDescription": f"audit message not built: {exc.__class__.__name__}"}
    line = json.dumps(msg, separators=(",", ":"), sort_keys=False)
    # ``audit`` in extra lets the JSON log formatter embed the message instead of a string.
    _log.info(line, extra={"audit": msg})
