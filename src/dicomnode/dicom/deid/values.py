"""Value transformations: date shifting, Patient's Age, dummy values per VR.

Pure string functions; the engine caches their results per instance of
:class:`~dicomnode.dicom.deid.engine.Deidentifier`.
"""

from __future__ import annotations

import datetime as _dt
import re

__all__ = [
    "age_string",
    "cap_age",
    "dummy_text",
    "parse_da",
    "shift_da",
    "shift_dt",
    "shift_values",
]

# PS3.5 6.2: DT is YYYY[MM[DD[HH[MM[SS[.F{1-6}]]]]]][&ZZXX]
_DT = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{6}(?:\.\d{1,6})?|\d{2}|\d{4})?([+-]\d{4})?")
_MAX_LEN = {"AE": 16, "AS": 4, "CS": 16, "DS": 16, "IS": 12, "LO": 64, "SH": 16, "PN": 64}


def parse_da(value: str) -> _dt.date | None:
    """A full DA value (``YYYYMMDD``, or ACR-NEMA ``YYYY.MM.DD``) as a date; None otherwise."""
    v = value.strip(" \x00")
    if len(v) == 10 and v[4] == "." and v[7] == ".":
        v = v[:4] + v[5:7] + v[8:]
    if len(v) != 8 or not v.isdigit():
        return None
    try:
        return _dt.date(int(v[:4]), int(v[4:6]), int(v[6:]))
    except ValueError:
        return None


def _shift_partial(year: str, month: str | None, day: str | None, days: int) -> str | None:
    """Shift a date of year, month or day precision, keeping its precision.

    A partial date (YYYY or YYYYMM, allowed in DT and by old writers in DA) is
    shifted from the middle of its period, so the result keeps the same
    precision and is off from the true shifted date by at most half the period.
    """
    try:
        if day is not None and month is not None:
            d = _dt.date(int(year), int(month), int(day))
        elif month is not None:
            d = _dt.date(int(year), int(month), 15)
        else:
            d = _dt.date(int(year), 7, 2)
        d += _dt.timedelta(days=days)
    except (ValueError, OverflowError):
        return None
    if d.year < 1:
        return None
    if day is not None:
        return f"{d.year:04d}{d.month:02d}{d.day:02d}"
    if month is not None:
        return f"{d.year:04d}{d.month:02d}"
    return f"{d.year:04d}"


def shift_da(value: str, days: int) -> str | None:
    """Shift one DA value by whole ``days``.

    Accepts ``YYYYMMDD``, ACR-NEMA ``YYYY.MM.DD`` (written back as ``YYYYMMDD``),
    partial ``YYYY``/``YYYYMM`` (precision kept) and ranges ``A-B`` (each end shifted).

    Returns
    -------
    str | None
        The shifted value, ``""`` for an empty one, or None when the value is not a
        date (the caller then drops it rather than keep an unparsed original).
    """
    v = value.strip(" \x00")
    if not v:
        return ""
    if "-" in v:
        parts = [shift_da(p, days) if p else "" for p in v.split("-")]
        return None if len(parts) != 2 or None in parts else "-".join(parts)  # type: ignore[arg-type]
    if len(v) == 10 and v[4] == "." and v[7] == ".":
        v = v[:4] + v[5:7] + v[8:]
    if not v.isdigit() or len(v) not in (4, 6, 8):
        return None
    return _shift_partial(v[:4], v[4:6] or None, v[6:8] or None, days)


def shift_dt(value: str, days: int) -> str | None:
    """Shift one DT value by whole ``days``; time of day, fraction and UTC offset are kept.

    Returns
    -------
    str | None
        As :func:`shift_da`.
    """
    v = value.strip(" \x00")
    if not v:
        return ""
    m = _DT.fullmatch(v)
    if m is None:
        return None
    year, month, day, time, offset = m.groups()
    if day is not None and month is None:
        return None
    date = _shift_partial(year, month, day, days)
    if date is None:
        return None
    return date + (time or "") + (offset or "")


def shift_values(value: str, vr: str, days: int) -> str | None:
    """Shift every value of a multi-valued DA or DT string (``\\``-separated).

    Returns None when no value could be shifted; values that cannot be parsed are
    dropped (dicognito#61: multi-valued dates; #123: partial dates).
    """
    fn = shift_da if vr == "DA" else shift_dt
    out = [s for s in (fn(part, days) for part in value.split("\\")) if s is not None]
    if not out and value.strip(" \x00"):
        return None
    return "\\".join(out)


def age_string(birth: _dt.date, on: _dt.date, cap_years: int | None) -> str | None:
    """Patient's Age (AS) on a date: days below a month, months below two years, else years.

    Ages at or above ``cap_years`` are reported as ``cap_years`` (deid.md 5.3:
    90 and over bucketed). None if ``on`` is before ``birth``.
    """
    if on < birth:
        return None
    days = (on - birth).days
    years = on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))
    if cap_years is not None and years >= cap_years:
        return f"{min(cap_years, 999):03d}Y"
    if days < 31:
        return f"{days:03d}D"
    months = (on.year - birth.year) * 12 + on.month - birth.month - (on.day < birth.day)
    if months < 24:
        return f"{months:03d}M"
    return f"{min(years, 999):03d}Y"


def cap_age(value: str, cap_years: int | None) -> str:
    """Bucket an existing AS value at ``cap_years`` (``"093Y"`` -> ``"090Y"``)."""
    v = value.strip()
    if cap_years is None or len(v) != 4 or not v[:3].isdigit():
        return v
    n, unit = int(v[:3]), v[3]
    years = {"Y": n, "M": n // 12, "W": n // 52, "D": n // 365}.get(unit)
    if years is not None and years >= cap_years:
        return f"{min(cap_years, 999):03d}Y"
    return v


def dummy_text(vr: str) -> str:
    """A fixed non-empty dummy for D on a VR that has no keyed pseudonym (PS3.15 E.1.1)."""
    return {
        "DA": "19000101",
        "DT": "19000101000000",
        "TM": "000000",
        "AS": "000Y",
        "DS": "0",
        "IS": "0",
        "CS": "DEIDENTIFIED"[: _MAX_LEN["CS"]],
        "AE": "DEIDENTIFIED",
        "PN": "ANONYMOUS",
        "UR": "urn:dicomnode:removed",
    }.get(vr, "DEIDENTIFIED")


def max_length(vr: str) -> int | None:
    """Maximum value length of a string VR (PS3.5 Table 6.2-1), None where unbounded."""
    return _MAX_LEN.get(vr) or {"ST": 1024, "LT": 10240}.get(vr)
