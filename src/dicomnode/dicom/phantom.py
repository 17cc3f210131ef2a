"""Synthetic CT phantom studies with known ground truth.

A body ellipse of soft tissue in air, round "lesions" (ellipsoids brighter than
tissue) and, as distractors, thin in-plane "vessels" exactly as bright as the
lesions, so that a fixed threshold cannot find the lesions and a model has to
learn shape. Every study carries planted patient identifiers (the de-id tests
look for them) and deterministic UIDs from its seed.

Pure: returns pydicom datasets and numpy arrays; writing files is the caller's
business (``dicomnode demo-study``, the tests' helpers, the benchmarks).
"""

from __future__ import annotations

import datetime as _dt
import uuid
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

__all__ = ["Lesion", "PhantomStudy", "PhantomSpec", "make_ct_study", "phantom_uid"]

TISSUE_HU = 40.0
LESION_HU = 110.0
AIR_HU = -1000.0
_INTERCEPT = -1024.0


def phantom_uid(*parts: object) -> str:
    """A deterministic ``2.25.`` UID from ``parts`` (a name-based UUID, RFC 4122 v5).

    Not pydicom's ``generate_uid(prefix=None, entropy_srcs=...)``: with no prefix it
    ignores the entropy sources and returns a random UUID.
    """
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, '/'.join(str(p) for p in parts)).int}"


@dataclass(frozen=True)
class Lesion:
    """One ellipsoid lesion, in voxel coordinates of the phantom volume."""

    center: tuple[float, float, float]
    """(z, y, x) voxel coordinates."""
    radii_mm: tuple[float, float, float]
    """(z, y, x) semi-axes in millimetres."""


@dataclass(frozen=True)
class PhantomSpec:
    """What to generate. Every field has a default that makes a small, quick study."""

    seed: int = 0
    n_slices: int = 32
    rows: int = 128
    columns: int = 128
    pixel_spacing_mm: float = 1.5
    slice_thickness_mm: float = 3.0
    n_lesions: int = 2
    """Upper bound; a lesion that does not fit in the body is skipped."""
    lesions: tuple[Lesion, ...] | None = None
    """Plant exactly these lesions (ground truth at known places, e.g. several lesions
    for per-finding results) instead of ``n_lesions`` random ones; each must lie inside
    the volume and not overlap another."""
    lesion_radius_mm: tuple[float, float] = (5.0, 12.0)
    n_vessels: int = 6
    noise_hu: float = 25.0
    patient_id: str = "PHANTOM-0001"
    patient_name: str = "Phantom^Paula^Q"
    patient_birth_date: str = "19610412"
    patient_sex: str = "F"
    accession_number: str = "ACC-PH-0001"
    study_date: str = "20260301"
    study_time: str = "101500"
    study_description: str = "CT CHEST PHANTOM"
    series_description: str = "AXIAL 3MM"
    institution_name: str = "Phantom General Hospital"
    referring_physician: str = "Doctor^Referring"
    body_part: str = "CHEST"
    study_instance_uid: str | None = None
    """None: derived from patient_id and seed."""
    series_number: int = 2


@dataclass(frozen=True)
class PhantomStudy:
    """A generated study: one CT series and its ground truth."""

    spec: PhantomSpec
    datasets: list[Dataset]
    """One dataset per slice, ordered by slice position, with file_meta set."""
    hu: np.ndarray = field(repr=False)
    """(z, y, x) float32 Hounsfield units before quantisation."""
    mask: np.ndarray = field(repr=False)
    """(z, y, x) uint8, 1 inside a lesion."""
    vessel_mask: np.ndarray = field(repr=False)
    """(z, y, x) uint8, 1 inside a distractor vessel (not a lesion)."""
    lesions: list[Lesion]

    @property
    def study_instance_uid(self) -> str:
        return str(self.datasets[0].StudyInstanceUID)

    @property
    def series_instance_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)


def _volume(
    spec: PhantomSpec, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Lesion]]:
    z, y, x = spec.n_slices, spec.rows, spec.columns
    sy = sx = spec.pixel_spacing_mm
    sz = spec.slice_thickness_mm
    yy, xx = np.mgrid[0:y, 0:x].astype(np.float32)
    cy, cx = (y - 1) / 2, (x - 1) / 2
    ay, ax = 0.38 * y * rng.uniform(0.9, 1.05), 0.45 * x * rng.uniform(0.9, 1.05)
    body2d = ((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 <= 1.0

    hu = np.full((z, y, x), AIR_HU, dtype=np.float32)
    hu[:, body2d] = TISSUE_HU
    mask = np.zeros((z, y, x), dtype=np.uint8)
    vessels = np.zeros((z, y, x), dtype=np.uint8)

    zz = np.arange(z, dtype=np.float32)[:, None, None]
    lesions: list[Lesion] = []
    for lesion in spec.lesions or ():
        c, radii = lesion.center, lesion.radii_mm
        inside = (
            ((zz - c[0]) * sz / radii[0]) ** 2
            + ((yy[None] - c[1]) * sy / radii[1]) ** 2
            + ((xx[None] - c[2]) * sx / radii[2]) ** 2
        ) <= 1.0
        if not inside.any() or (inside & (mask > 0)).any():
            raise ValueError(f"lesion at {c} lies outside the volume or overlaps another")
        mask[inside] = 1
        lesions.append(lesion)
    for _ in range(0 if spec.lesions is not None else spec.n_lesions):
        r = rng.uniform(*spec.lesion_radius_mm)
        radii = (r * rng.uniform(0.8, 1.2), r * rng.uniform(0.8, 1.2), r * rng.uniform(0.8, 1.2))
        z_lo, z_hi = radii[0] / sz + 1, z - radii[0] / sz - 2
        if z_hi <= z_lo:
            continue  # too few slices for this lesion
        for _try in range(20):
            c = (
                rng.uniform(z_lo, z_hi),
                rng.uniform(cy - 0.6 * ay, cy + 0.6 * ay),
                rng.uniform(cx - 0.6 * ax, cx + 0.6 * ax),
            )
            inside = (
                ((zz - c[0]) * sz / radii[0]) ** 2
                + ((yy[None] - c[1]) * sy / radii[1]) ** 2
                + ((xx[None] - c[2]) * sx / radii[2]) ** 2
            ) <= 1.0
            if (
                z > 2 * radii[0] / sz
                and not (inside & (mask > 0)).any()
                and inside[:, ~body2d].sum() == 0
            ):
                mask[inside] = 1
                lesions.append(Lesion(c, radii))
                break
    hu[mask > 0] = LESION_HU

    # Distractors: thin bright in-plane segments, as bright as lesions but elongated.
    for _ in range(spec.n_vessels):
        k = int(rng.integers(0, z))
        thick = int(rng.integers(1, 3))
        z0, z1 = k, min(z, k + int(rng.integers(1, 4)))
        length = rng.uniform(0.25, 0.5) * x
        theta = rng.uniform(0, np.pi)
        py, px = (
            rng.uniform(cy - 0.5 * ay, cy + 0.5 * ay),
            rng.uniform(cx - 0.5 * ax, cx + 0.5 * ax),
        )
        ts = np.linspace(-length / 2, length / 2, int(length * 2))
        for t in ts:
            iy, ix = int(round(py + t * np.sin(theta))), int(round(px + t * np.cos(theta)))
            y0, x0 = max(0, iy - thick // 2), max(0, ix - thick // 2)
            seg = (slice(z0, z1), slice(y0, min(y, iy + thick)), slice(x0, min(x, ix + thick)))
            region = body2d[seg[1], seg[2]] & (mask[seg] == 0)
            vessels[seg][region] = 1
    hu[vessels > 0] = LESION_HU
    hu += rng.normal(0.0, spec.noise_hu, size=hu.shape).astype(np.float32) * (hu > AIR_HU + 1)
    return hu, mask, vessels, lesions


def make_ct_study(spec: PhantomSpec | None = None, **overrides: object) -> PhantomStudy:
    """Generate a CT phantom study.

    Parameters
    ----------
    spec
        What to generate; keyword ``overrides`` replace its fields.

    Returns
    -------
    PhantomStudy
        Datasets in Explicit VR Little Endian with file meta, the HU volume,
        the lesion and vessel masks and the lesion list.
    """
    if spec is None:
        spec = PhantomSpec()
    if overrides:
        spec = PhantomSpec(**{**spec.__dict__, **overrides})  # type: ignore[arg-type]
    if spec.n_slices < 1 or spec.rows < 8 or spec.columns < 8:
        raise ValueError(f"phantom too small: {spec.n_slices}x{spec.rows}x{spec.columns}")
    rng = np.random.default_rng(spec.seed)
    hu, mask, vessels, lesions = _volume(spec, rng)
    stored = np.clip(np.round(hu - _INTERCEPT), 0, 4095).astype(np.uint16)

    study_uid = spec.study_instance_uid or phantom_uid("study", spec.patient_id, spec.seed)
    series_uid = phantom_uid("series", study_uid, spec.series_number)
    for_uid = phantom_uid("for", study_uid)
    birth = _dt.date(
        int(spec.patient_birth_date[:4]),
        int(spec.patient_birth_date[4:6]),
        int(spec.patient_birth_date[6:8]),
    )
    sdate = _dt.date(int(spec.study_date[:4]), int(spec.study_date[4:6]), int(spec.study_date[6:8]))
    age = sdate.year - birth.year - ((sdate.month, sdate.day) < (birth.month, birth.day))
    x0 = -(spec.columns - 1) * spec.pixel_spacing_mm / 2
    y0 = -(spec.rows - 1) * spec.pixel_spacing_mm / 2

    datasets = []
    for k in range(spec.n_slices):
        sop_uid = phantom_uid("sop", series_uid, k)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = spec.study_date
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = spec.study_time
        ds.AccessionNumber = spec.accession_number
        ds.Modality = "CT"
        ds.Manufacturer = "dicomnode phantom"
        ds.InstitutionName = spec.institution_name
        ds.ReferringPhysicianName = spec.referring_physician
        ds.StationName = "PHANTOM-CT1"
        ds.StudyDescription = spec.study_description
        ds.SeriesDescription = spec.series_description
        ds.ManufacturerModelName = "SynthCT"
        ds.PatientName = spec.patient_name
        ds.PatientID = spec.patient_id
        ds.PatientBirthDate = spec.patient_birth_date
        ds.PatientSex = spec.patient_sex
        ds.PatientAge = f"{age:03d}Y"
        ds.BodyPartExamined = spec.body_part
        ds.SliceThickness = spec.slice_thickness_mm
        ds.KVP = 120
        ds.DeviceSerialNumber = "SN-PHANTOM-42"
        ds.SoftwareVersions = "1.0"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = spec.series_number
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [
            round(x0, 4),
            round(y0, 4),
            round(k * spec.slice_thickness_mm, 4),
        ]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = round(k * spec.slice_thickness_mm, 4)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = spec.rows
        ds.Columns = spec.columns
        ds.PixelSpacing = [spec.pixel_spacing_mm, spec.pixel_spacing_mm]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.RescaleIntercept = _INTERCEPT
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.PixelData = stored[k].tobytes()
        datasets.append(ds)
    return PhantomStudy(spec, datasets, hu, mask, vessels, lesions)
