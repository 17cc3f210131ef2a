"""HL7 v2.5.1 ORU^R01 worklist notifications, and MLLP to send them.

:func:`build_oru` turns a :class:`Notification` (original identifiers, findings,
priority) into an ER7 message, built and validated by ``hl7apy`` against the
2.5.1 ORU_R01 structure (construct valid or raise). :func:`send_mllp` frames it
(MLLP release 1: ``0x0B`` message ``0x1C 0x0D``, HL7 v2.5.1 Appendix C), waits for
the acknowledgement and maps it: AA/CA is delivered, AE/AR/CE/CR is a
:class:`~dicomnode.errors.SendError` carrying the receiver's reason (the outbox
retries it, then dead-letters it).

Where the message puts things (the fields RIS products read):

=====================  ===================================================
PID-3                  PatientID ^^^ IssuerOfPatientID (original, from the vault)
PID-5, -7, -8          PatientName (XPN order), PatientBirthDate, PatientSex
ORC-2 / OBR-2          Placer Order Number / Imaging Service Request, if sent
ORC-3 / OBR-3          Filler Order Number / Imaging Service Request, else the
                       Accession Number (one of the two is required)
OBR-18                 Accession Number (IHE Radiology's place for it)
OBR-25, OBX-11         ``P``: preliminary (an AI result, not a signed report)
OBR-27.6, ORC-7.6      priority (S, A, R): where pre-2.5 RIS products read it
TQ1-9                  priority (HL7 table 0485): where 2.5 receivers read it
OBX (CWE) per label    coded finding (the model label's type code), present or
                       absent (SNOMED CT 52101004 / 2667000), OBX-17 = model
OBX (NM) per measure   volume (mm3) and largest diameter (mm) of a present label
=====================  ===================================================

The message holds patient data: it is built in memory at send time, never
written to disk or logged.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import socket
from dataclasses import dataclass

from dicomnode.errors import SendError

__all__ = ["Ack", "Notification", "Observation", "build_oru", "control_id", "send_mllp"]

_START, _END = b"\x0b", b"\x1c\x0d"
PRIORITY_CODES = {"STAT": ("S", "Stat"), "ASAP": ("A", "ASAP"), "ROUTINE": ("R", "Routine")}
_PRESENT = ("52101004", "Present", "SCT")
_ABSENT = ("2667000", "Absent", "SCT")
_VOLUME = ("118565006", "Volume", "SCT")
_DIAMETER = ("103355008", "Width", "SCT")  # the same concept the SR's TID 1411 uses


@dataclass(frozen=True)
class Observation:
    """One label of one model: coded finding, present or not, and its measurements."""

    code: tuple[str, str, str]
    """(value, meaning, coding scheme) of the finding, e.g. SNOMED CT "Lesion"."""
    present: bool
    model_name: str
    model_version: str
    volume_mm3: float | None = None
    max_diameter_mm: float | None = None


@dataclass(frozen=True)
class Notification:
    """Everything an ORU^R01 carries. Holds patient data: never log it."""

    control_id: str
    sending_application: str
    sending_facility: str | None
    receiving_application: str | None
    receiving_facility: str | None
    patient_id: str
    issuer_of_patient_id: str | None
    patient_name: str | None
    """DICOM PN form (``Family^Given^Middle^Prefix^Suffix``)."""
    patient_birth_date: str | None
    patient_sex: str | None
    accession_number: str | None
    placer_order_number: str | None
    filler_order_number: str | None
    priority: str
    """STAT, ASAP or ROUTINE."""
    observations: tuple[Observation, ...]
    observed_at: _dt.datetime


@dataclass(frozen=True)
class Ack:
    """An HL7 acknowledgement: MSA-1 code, MSA-2 control ID, and the receiver's text."""

    code: str
    control_id: str
    text: str


def control_id(key: str) -> str:
    """A stable MSH-10 (at most 20 characters, the 2.3 limit many receivers keep) for
    ``key``: a retry sends the same ID, so the receiver can recognise a duplicate."""
    return "DN" + hashlib.sha256(key.encode()).hexdigest()[:18].upper()


def _escape(value: str) -> str:
    """HL7 escape sequences (2.5.1 section 2.7.4) for the default delimiters, and no
    line breaks (a CR would end the segment)."""
    out = value.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\")
    out = out.replace("&", "\\T\\").replace("~", "\\R\\")
    return out.replace("\r", " ").replace("\n", " ")


def _xpn(person_name: str | None) -> str:
    """DICOM PN (family^given^middle^prefix^suffix, first component group) as HL7 XPN
    (family^given^second^suffix^prefix)."""
    if not person_name:
        return ""
    parts = (person_name.split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (_escape(p) for p in parts)
    return "^".join([family, given, middle, suffix, prefix]).rstrip("^")


def _number(value: float) -> str:
    return f"{value:.1f}"


def build_oru(n: Notification) -> str:
    """The ORU^R01 of ``n`` as ER7 text (segments separated by CR).

    Raises
    ------
    ValueError
        A required value is missing (PatientID, an order identifier, a priority), or
        hl7apy's validation against the 2.5.1 ORU_R01 structure failed.
    """
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.core import Message
    from hl7apy.exceptions import HL7apyException

    if not n.patient_id:
        raise ValueError("PatientID is empty: the worklist cannot match the patient")
    filler = n.filler_order_number or n.accession_number
    if not (n.placer_order_number or filler):
        raise ValueError("no Placer/Filler Order Number and no AccessionNumber: the worklist "
                         "cannot match the order")
    if n.priority not in PRIORITY_CODES:
        raise ValueError(f"priority must be one of {sorted(PRIORITY_CODES)}")
    code, text = PRIORITY_CODES[n.priority]
    try:
        m = Message("ORU_R01", version="2.5.1", validation_level=VALIDATION_LEVEL.STRICT)
        m.msh.msh_3 = _escape(n.sending_application)
        if n.sending_facility:
            m.msh.msh_4 = _escape(n.sending_facility)
        if n.receiving_application:
            m.msh.msh_5 = _escape(n.receiving_application)
        if n.receiving_facility:
            m.msh.msh_6 = _escape(n.receiving_facility)
        m.msh.msh_7 = _dt.datetime.now().strftime("%Y%m%d%H%M%S")
        m.msh.msh_9 = "ORU^R01^ORU_R01"
        m.msh.msh_10 = n.control_id
        m.msh.msh_11 = "P"
        m.msh.msh_12 = "2.5.1"
        m.msh.msh_15 = "AL"  # accept acknowledgement: always
        result = m.add_group("ORU_R01_PATIENT_RESULT")
        pid = result.add_group("ORU_R01_PATIENT").pid
        pid.pid_1 = "1"
        pid.pid_3 = _escape(n.patient_id) + (
            f"^^^{_escape(n.issuer_of_patient_id)}" if n.issuer_of_patient_id else "")
        pid.pid_5 = _xpn(n.patient_name) or '""'
        if n.patient_birth_date:
            pid.pid_7 = _escape(n.patient_birth_date)
        if n.patient_sex:
            pid.pid_8 = _escape(n.patient_sex)
        order = result.add_group("ORU_R01_ORDER_OBSERVATION")
        order.orc.orc_1 = "RE"  # observations to follow
        if n.placer_order_number:
            order.orc.orc_2 = _escape(n.placer_order_number)
        if filler:
            order.orc.orc_3 = _escape(filler)
        order.orc.orc_7 = f"^^^^^{code}"
        obr = order.obr
        obr.obr_1 = "1"
        if n.placer_order_number:
            obr.obr_2 = _escape(n.placer_order_number)
        if filler:
            obr.obr_3 = _escape(filler)
        obr.obr_4 = "DICOMNODE-AI^AI image analysis^L"
        obr.obr_7 = n.observed_at.strftime("%Y%m%d%H%M%S")
        if n.accession_number:
            obr.obr_18 = _escape(n.accession_number)
        obr.obr_25 = "P"
        obr.obr_27 = f"^^^^^{code}"
        tq1 = order.add_group("ORU_R01_TIMING_QTY").tq1
        tq1.tq1_1 = "1"
        tq1.tq1_9 = f"{code}^{text}^HL70485"
        set_id = 0
        for sub_id, o in enumerate(n.observations, start=1):
            method = f"{_escape(o.model_name)}^{_escape(o.model_name)} {_escape(o.model_version)}^L"
            rows: list[tuple[str, str, str, str | None]] = [
                ("CWE", "^".join(o.code), "^".join(_PRESENT if o.present else _ABSENT), None)]
            if o.present and o.volume_mm3 is not None:
                rows.append(("NM", "^".join(_VOLUME), _number(o.volume_mm3),
                             "mm3^cubic millimeter^UCUM"))
            if o.present and o.max_diameter_mm is not None:
                rows.append(("NM", "^".join(_DIAMETER), _number(o.max_diameter_mm),
                             "mm^millimeter^UCUM"))
            for value_type, ident, value, units in rows:
                set_id += 1
                obx = order.add_group("ORU_R01_OBSERVATION").obx
                obx.obx_1 = str(set_id)
                obx.obx_2 = value_type
                obx.obx_3 = ident
                obx.obx_4 = str(sub_id)  # groups a finding with its measurements
                obx.obx_5 = value
                if units:
                    obx.obx_6 = units
                obx.obx_11 = "P"
                obx.obx_17 = method
        m.validate()
        return str(m.to_er7())
    except HL7apyException as exc:
        raise ValueError(f"the ORU^R01 does not validate: {exc.__class__.__name__}") from None


def _parse_ack(raw: bytes) -> Ack:
    """MSA of an acknowledgement, read with hl7apy.

    Raises
    ------
    SendError
        Not a parsable HL7 message with an MSA segment.
    """
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.exceptions import HL7apyException
    from hl7apy.parser import parse_message

    text = raw.decode("utf-8", "replace").strip("\r\n")
    try:
        msg = parse_message(text, validation_level=VALIDATION_LEVEL.TOLERANT,
                            find_groups=False)
        msa = msg.msa
        code = str(msa.msa_1.value or "")
        ctl = str(msa.msa_2.value or "")
        reason = str(msa.msa_3.value or "") if msa.msa_3 else ""
        err = [s for s in msg.children if s.name == "ERR"]
        if not reason and err:
            reason = str(err[0].value).split("|", 1)[-1]
    except (HL7apyException, AttributeError, IndexError) as exc:
        raise SendError(f"the acknowledgement is not a readable HL7 message "
                        f"({exc.__class__.__name__})") from None
    if not code:
        raise SendError("the acknowledgement has no MSA-1 code")
    return Ack(code, ctl, reason.replace("\r", " ")[:200])


def send_mllp(host: str, port: int, message: str, *, timeout_s: float) -> Ack:
    """Send one message over MLLP and wait for its acknowledgement.

    Returns the ACK when it is AA or CA (original or enhanced mode: the receiver
    committed the message).

    Raises
    ------
    SendError
        The connection failed or timed out, the reply is not an ACK of this message,
        or the receiver answered AE/AR/CE/CR (its reason in the message).
    """
    payload = _START + message.encode("utf-8") + _END
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(payload)
            buf = bytearray()
            while _END not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    raise SendError(f"{host}:{port} closed the connection before acknowledging")
                buf += chunk
                if len(buf) > 1 << 20:
                    raise SendError(f"{host}:{port} sent more than 1 MiB without an MLLP end")
    except OSError as exc:
        raise SendError(f"MLLP to {host}:{port} failed: {exc.__class__.__name__}") from None
    start = buf.find(_START)
    ack = _parse_ack(bytes(buf[start + 1 if start >= 0 else 0: buf.find(_END)]))
    sent_id = message.split("\r", 1)[0].split("|")[9]
    if ack.control_id != sent_id:
        raise SendError(f"{host}:{port} acknowledged another message (MSA-2 differs)")
    if ack.code not in ("AA", "CA"):
        raise SendError(f"{host}:{port} answered {ack.code}" + (f": {ack.text}" if ack.text
                                                                else ""))
    return ack
