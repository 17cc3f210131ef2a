"""Synthetic chest radiographs with a known nodule, for the radiograph demo and its tests.

A posteroanterior (PA) chest projection drawn from simple shapes: a body outline, two
dark lung fields, a heart shadow and a spine, curved rib shadows, and, when asked, one
round "nodule" (a small bright blob) inside a lung field, placed at random. Values are
stored as 12-bit unsigned integers in a Digital X-Ray Image Storage - For Presentation
object (PS3.3 A.26), MONOCHROME2 by default or MONOCHROME1 (white is low) to test that
inversion; the nodule's mask is the ground truth.

Pure: returns a pydicom dataset and numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

from dicomnode.dicom.phantom import phantom_uid

__all__ = ["DX_FOR_PRESENTATION", "RadiographPhantom", "make_chest_radiograph"]

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
"""Digital X-Ray Image Storage - For Presentation."""
_MAX = 4095


@dataclass(frozen=True)
class RadiographPhantom:
    """One synthetic chest radiograph and its ground truth."""

    dataset: Dataset
    values: np.ndarray = field(repr=False)
    """(rows, columns) stored values as a MONOCHROME2 reader sees them (bright = dense)."""
    nodule: np.ndarray = field(repr=False)
    """(rows, columns) bool: the nodule, all False when there is none."""
    has_nodule: bool


def _image(rows: int, cols: int, rng: np.random.Generator, nodule: bool
           ) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[:rows, :cols].astype(np.float64)
    yn, xn = y / rows, x / cols
    img = np.full((rows, cols), 300.0)
    body = ((xn - 0.5) / 0.46) ** 2 + ((yn - 0.55) / 0.52) ** 2 < 1
    img[body] = 2200.0
    lungs = np.zeros((rows, cols), bool)
    for cx in (0.31, 0.69):
        lung = ((xn - cx) / 0.15) ** 2 + ((yn - 0.45) / 0.28) ** 2 < 1
        lungs |= lung
    img[lungs] = 900.0
    heart = ((xn - 0.55) / 0.13) ** 2 + ((yn - 0.62) / 0.12) ** 2 < 1
    img[heart] = 1900.0
    spine = (np.abs(xn - 0.5) < 0.04) & body
    img[spine] = 2600.0
    for k in range(7):  # ribs: bright arcs across the lung fields
        yc = 0.22 + 0.075 * k
        arc = np.abs(yn - yc - 0.06 * ((xn - 0.5) * 2.2) ** 2) < 0.012
        img[arc & lungs] += 450.0
    mask = np.zeros((rows, cols), bool)
    if nodule:
        candidates = np.argwhere(lungs & (np.abs(xn - 0.5) > 0.12))
        cy, cx = candidates[rng.integers(len(candidates))]
        radius = rng.uniform(0.025, 0.045) * rows
        d2 = (y - cy) ** 2 + (x - cx) ** 2
        blob = np.exp(-d2 / (2 * (radius / 1.5) ** 2))
        img += 900.0 * blob * lungs
        mask = (d2 <= radius**2) & lungs
    img += rng.normal(0, 60, (rows, cols))
    # a little blur of the anatomy edges, as a real projection has
    from scipy.ndimage import gaussian_filter

    img = gaussian_filter(img, 1.2)
    return np.clip(np.round(img), 0, _MAX).astype(np.uint16), mask


def make_chest_radiograph(
    *,
    seed: int = 0,
    nodule: bool = True,
    rows: int = 256,
    columns: int = 256,
    photometric: str = "MONOCHROME2",
    patient_id: str = "CXR-0001",
    view_position: str = "PA",
    presentation_intent: str = "FOR PRESENTATION",
) -> RadiographPhantom:
    """A synthetic PA chest radiograph, with or without a nodule.

    Parameters
    ----------
    photometric
        MONOCHROME2 (high values bright) or MONOCHROME1 (high values dark: the stored
        values are inverted, what a reader must undo).
    """
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    rng = np.random.default_rng(seed)
    values, mask = _image(rows, columns, rng, nodule)
    stored = values if photometric == "MONOCHROME2" else (_MAX - values).astype(np.uint16)
    study_uid = phantom_uid("cxr study", patient_id, seed)
    series_uid = phantom_uid("cxr series", study_uid)
    sop_uid = phantom_uid("cxr sop", series_uid, photometric)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260302"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "091500"
    ds.AccessionNumber = f"ACC-{patient_id}"[:16]  # SH: 16 characters at most
    ds.Modality = "DX"
    ds.Manufacturer = "dicomnode phantom"
    ds.ReferringPhysicianName = "Doctor^Referring"
    ds.StudyDescription = "CHEST PA"
    ds.SeriesDescription = "PA"
    ds.PatientName = "Phantom^Radiograph"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view_position
    ds.ImageLaterality = "U"
    ds.PatientOrientation = ["L", "F"] if view_position == "PA" else ["R", "F"]
    ds.PresentationIntentType = presentation_intent
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.ImagerPixelSpacing = [0.4, 0.4]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    ds.WindowCenter, ds.WindowWidth = 1600, 3200
    ds.BurnedInAnnotation = "NO"
    ds.PixelData = stored.tobytes()
    return RadiographPhantom(dataset=ds, values=values, nodule=mask, has_nodule=nodule)
