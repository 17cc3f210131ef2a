"""Clean Descriptors keeps numbers by what they are (issue 16; deid.md 6, cases 6-8 extended).

Three parts:

- ``ADVERSARIAL``: dates, times, phone numbers and identifier/address numbers in
  several languages and formats, each with the exact cleaned output (and so with
  every planted digit gone);
- ``CLINICAL``: descriptors that must pass unchanged (units, field strengths,
  spinal levels, b-values, counts);
- hypothesis properties: generated dates/phones/IDs planted between clinical
  descriptors, in the cleaner and in every attribute the engine cleans.
"""

from __future__ import annotations

import datetime as dt
import re
import warnings

import pytest
from deidutil import assert_absent, ct, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from dicomnode.dicom.deid.descriptors import DescriptorCleaner
from dicomnode.dicom.deid.table import load_rows
from dicomnode.dicom.deid.values import max_length

CLEAN = DescriptorCleaner().clean

# (value, cleaned) -- the cleaned value is exact, so no planted digit can survive.
ADVERSARIAL = [
    # numeric dates, / . - separators, 2- and 4-digit years, both orders
    ("CT head 12/05/2023", "CT head"),
    ("CT head 12.05.23", "CT head"),
    ("DOB 12.05.23 CT chest", "CT chest"),
    ("MR brain 5-12-23", "MR brain"),
    ("CT 2023-05-12 chest", "CT chest"),
    ("CT chest 2023/5/12", "CT chest"),
    ("CT 12 . 05 . 2023 head", "CT head"),
    ("CT 20230512 head", "CT head"),
    ("CT head 05/2023", "CT head"),
    ("CT head 2023-05", "CT head"),
    ("CT head 12/05", "CT head"),
    # English month names
    ("CT head 12 March 2023", "CT head"),
    ("CT March 12, 2023 head", "CT head"),
    ("CT Mar 12th 23 head", "CT head"),
    ("CT 12-Mar-2023 head", "CT head"),
    ("CT 3rd of May 2023", "CT"),
    ("CT Sept 2023 chest", "CT chest"),
    # German
    ("MR Kopf 12. März 2023", "MR"),
    ("CT 3. Okt. 2022 Thorax", "CT Thorax"),
    ("CT 1. Dezember 22 Abdomen", "CT Abdomen"),
    ("CT 12. Mai Schädel", "CT"),
    ("CT 12. Maerz 2023 Becken", "CT"),
    # French
    ("IRM 1er janvier 2023 crâne", ""),
    ("CT 14 juillet 2022 thorax", "CT thorax"),
    ("CT 3 févr. 2021 abdomen", "CT abdomen"),
    ("CT 25 déc 2020 pelvis", "CT pelvis"),
    # Spanish
    ("TC 5 de mayo de 2023 torax", ""),
    ("CT 12 de dic. 2022 chest", "CT chest"),
    ("CT 3 ago 2021 chest", "CT chest"),
    ("CT septiembre de 2020 chest", "CT chest"),
    # times
    ("CT 14:30 head", "CT head"),
    ("CT 14:30:15.123 head", "CT head"),
    ("CT 2:30 pm head", "CT head"),
    ("CT 14h30 head", "CT head"),
    ("CT 14.30 Uhr head", "CT head"),
    ("CT 7am head", "CT head"),
    # phone shapes, with and without country prefix
    ("CT +49 30 1234 5678", "CT"),
    ("CT (030) 123-45-67 head", "CT head"),
    ("CT 06.12.34.56.78 head", "CT head"),
    ("CT 555 123 4567 head", "CT head"),
    ("CT 0049 171 1234567", "CT"),
    ("CT tel. 0171/1234567", "CT"),
    ("CT +33 6 12 34 56 78 head", "CT head"),
    ("CT 555-1234 head", "CT head"),
    ("CT chest 555 123 456", "CT chest"),
    # identifier and address words next to digit runs
    ("CT Room 12 head", "CT head"),
    ("CT Bett 4 Zimmer 12", "CT"),
    ("CT chest Hauptstraße 12", "CT chest"),
    ("12 Main Street CT", "CT"),
    ("CT 221B Baker Street", "CT"),
    ("CT 12 rue de la Paix", "CT"),
    ("CT Calle Mayor 7", "CT"),
    ("CT MRN: 4711 head", "CT head"),
    ("CT #12 head", "CT head"),
    ("CT Fall-Nr. 4711", "CT"),
    ("CT ID 123 head", "CT head"),
    ("CT cama 3 sala 2", "CT"),
    ("CT chambre 12 lit 2", "CT"),
    ("CT chest 55M", "CT chest"),
    ("CT chest 55 Y", "CT chest"),
    # clinical patterns next to identifiers: the pattern stays, the identifier goes
    ("Series 12/05/2023 axial", "Series axial"),
    ("Echo 12 March", "Echo"),
    ("5 mm 12.05.23", "5 mm"),
    ("3.0 T 1955", "3.0 T"),
    ("CT 2 of 3 14:30", "CT 2 of 3"),
    ("phase 2 Baker Street 12", "phase"),  # "2 Baker Street" reads as an address: fails closed
    ("CT head 1.25", "CT head"),
    ("CT 12 of 2023 head", "CT of head"),
    ("CT 1000 of 2 head", "CT of head"),
]

CLINICAL = [
    "CT chest abdomen pelvis",
    "AX T2 FLAIR 5mm C+",
    "MR L-SPINE C3-C4 T2 SAG",
    "3.0 T brain",
    "5 mm AX",
    "CT 120 kV",
    "2 of 3",
    "DWI b1000 ADC",
    "DWI b=800",
    "L4-5 axial",
    "L5/S1 sag",
    "T12 L1",
    "C2-C7",
    "T1W 3D",
    "phase 2 arterial",
    "Echo 2 Phase 3",
    "0.625 mm lung",
    "1.25mm",
    "PET 60 min",
    "MR 1.5T brain",
    "512x512",
    "10 mCi",
    "CT chest/abdomen",
    "2.5 mm 1.25 mm",
]


def test_adversarial_count():
    # the issue asks for at least 40 such cases
    assert len(ADVERSARIAL) >= 40


@pytest.mark.parametrize(("value", "expected"), ADVERSARIAL)
def test_adversarial_descriptor(value: str, expected: str):
    out = CLEAN(value)
    assert out == expected
    # belt and braces: no digit of the value survives unless the expected output has it
    assert set(re.findall(r"\d+", out)) <= set(re.findall(r"\d+", expected))


@pytest.mark.parametrize("value", CLINICAL)
def test_clinical_descriptor_unchanged(value: str):
    assert CLEAN(value) == value


# --- generated identifiers --------------------------------------------------------------

_MONTHS = {
    "en": "January February March April May June July August September October November December",
    "en3": "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec",
    "de": "Januar Februar März April Mai Juni Juli August September Oktober November Dezember",
    "fr": "janvier février mars avril mai juin juillet août septembre octobre novembre décembre",
    "es": "enero febrero marzo abril mayo junio julio agosto septiembre octubre noviembre "
    "diciembre",
}


def _date_forms(d: dt.date) -> list[str]:
    yy, yyyy = f"{d.year % 100:02d}", str(d.year)
    dd, mm = f"{d.day:02d}", f"{d.month:02d}"
    forms = []
    for sep in "/.-":
        forms += [
            f"{dd}{sep}{mm}{sep}{yyyy}",
            f"{dd}{sep}{mm}{sep}{yy}",
            f"{d.day}{sep}{d.month}{sep}{yy}",
            f"{mm}{sep}{dd}{sep}{yyyy}",
            f"{yyyy}{sep}{mm}{sep}{dd}",
        ]
    forms += [f"{yyyy}{mm}{dd}", f"{mm}/{yyyy}", f"{dd}/{mm}"]
    for lang, names in _MONTHS.items():
        month = names.split()[d.month - 1]
        forms += [f"{d.day} {month} {yyyy}", f"{month} {d.year}"]
        if lang.startswith("en"):
            forms += [f"{month} {d.day}, {yyyy}", f"{d.day}-{month}-{yy}"]
        elif lang == "de":
            forms.append(f"{d.day}. {month} {yyyy}")
        elif lang == "es":
            forms.append(f"{d.day} de {month} de {yyyy}")
    return forms


_dates = st.builds(
    lambda d, i: _date_forms(d)[i % len(_date_forms(d))],
    st.dates(dt.date(1900, 1, 1), dt.date(2099, 12, 31)),
    st.integers(0, 1000),
)
_times = st.builds(
    lambda h, m, fmt: fmt.format(h=h, m=m, h12=h % 12 or 12),
    st.integers(0, 23),
    st.integers(0, 59),
    st.sampled_from(
        [
            "{h}:{m:02d}",
            "{h:02d}:{m:02d}:07",
            "{h12}:{m:02d} pm",
            "{h}h{m:02d}",
            "{h}.{m:02d} Uhr",
            "{h12}am",
        ]
    ),
)
_group = st.integers(10, 9999).map(str)
_phones = st.builds(
    lambda prefix, groups, sep: prefix + sep.join(groups),
    st.sampled_from(["", "+49 ", "+1 ", "0033 ", "+34-", "(030) "]),
    st.lists(
        st.integers(2, 4).flatmap(lambda n: st.text("0123456789", min_size=n, max_size=n)),
        min_size=2,
        max_size=5,
    ),
    st.sampled_from([" ", ".", "-"]),
).filter(lambda p: sum(c.isdigit() for c in p) >= 6)  # no phone number is shorter
_ids = st.builds(
    lambda word, sep, number: f"{word}{sep}{number}",
    st.sampled_from(
        [
            "MRN",
            "ID",
            "Room",
            "Zimmer",
            "Bett",
            "Nr.",
            "No.",
            "#",
            "Tel",
            "Fall",
            "habitación",
            "chambre",
            "Street",
            "Hauptstraße",
            "Calle",
            "rue",
            "Apt",
        ]
    ),
    st.sampled_from([" ", ": ", "", "-", " # "]),
    st.integers(0, 99_999_999).map(str),
)
_long_runs = st.integers(10_000, 10**12).map(str)
_plants = st.one_of(
    _dates, _times, _phones, _ids, _long_runs, _group.map(lambda g: g + " Main Street")
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plant=_plants, a=st.sampled_from(CLINICAL), b=st.sampled_from(CLINICAL))
def test_planted_identifiers_never_survive(plant: str, a: str, b: str):
    # "; " keeps the clinical neighbours out of the plant's reach: "2 of 3 Calle 7" and
    # "Street 0.625 mm" are removed on purpose (a number next to an address word).
    assert CLEAN(f"{a}; {plant}; {b}") == f"{a} {b}"
    assert CLEAN(f"{plant}; {a}") == a
    assert CLEAN(plant) == ""


def _cleaned_attributes() -> list[tuple[str, str]]:
    """(keyword, VR) of every top-level text attribute Clean Descriptors cleans."""
    out = []
    for row in load_rows():
        if row.get("cleanDescOpt") != "C":
            continue
        if not re.fullmatch(r"[0-9A-Fa-f]{8}", row["id"]):
            continue  # repeating groups (60xx, 50xx)
        tag = int(row["id"], 16)
        keyword = keyword_for_tag(tag)
        if keyword and dictionary_VR(tag) in ("LO", "SH", "ST", "LT", "UT", "UC"):
            out.append((keyword, dictionary_VR(tag)))
    return out


CLEANED = _cleaned_attributes()


def test_cleaned_attribute_list_is_real():
    keywords = {k for k, _ in CLEANED}
    assert {"StudyDescription", "SeriesDescription", "ProtocolName"} <= keywords
    assert len(CLEANED) > 40


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plant=_plants, a=st.sampled_from(CLINICAL), b=st.sampled_from(CLINICAL))
def test_engine_cleans_planted_identifiers_in_every_cleaned_attribute(plant: str, a: str, b: str):
    ds = ct()
    ds.SpecificCharacterSet = "ISO_IR 192"
    value = f"{a}; {plant}; {b}"
    for keyword, vr in CLEANED:
        # the whole value, even past the VR's length (as a sender may): the engine cleans
        # first and truncates after, so a truncated plant never looks like a number
        tag = Tag(tag_for_keyword(keyword))
        raw = value.encode("utf-8")
        ds[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)
    with warnings.catch_warnings():  # pydicom warns about the lengths, on purpose
        warnings.simplefilter("ignore")
        result, data = run(ds)
    out = result.dataset
    seen = 0
    for keyword, vr in CLEANED:
        if keyword not in out:
            continue  # removed outright (an option or the IOD decided): nothing survives
        seen += 1
        limit = max_length(vr)
        expected = CLEAN(value)
        assert (
            str(out[keyword].value).rstrip() == (expected[:limit] if limit else expected).rstrip()
        )
        for digits in re.findall(r"\d+", str(out[keyword].value)):
            assert digits in f"{a} {b}", (keyword, out[keyword].value)
    assert seen >= 3
    if len(plant) >= 8:  # long enough not to occur by chance in UIDs or pixels
        assert_absent(data, [plant])
