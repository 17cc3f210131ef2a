"""Two-dimensional images as model input (dicomnode.dicom.image)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomnode.dicom.image import VoiValues, image_attributes, is_projection, load_image
from dicomnode.dicom.phantom import PhantomStudy
from dicomnode.errors import InferenceError

REAL_DX = (Path(__file__).resolve().parents[1] / "data" / "realworld"
           / "ImagingDataCommons+highdicom" / "data" / "test_files" / "dx_image.dcm")


def _radiograph(photometric: str = "MONOCHROME2", bits: int = 12) -> Dataset:
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 2**bits, size=(40, 30), dtype=np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image - For Presentation
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ViewPosition = "PA"
    ds.ImageLaterality = "U"
    ds.PatientOrientation = ["L", "F"]
    ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter, ds.WindowWidth = 1000, 500
    ds.PixelData = pixels.tobytes()
    return ds


def test_load_image_records_what_decides_how_a_model_reads_it() -> None:
    image = load_image(_radiograph())

    assert image.shape == (40, 30) and image.array.dtype == np.float32
    assert image.pixel_spacing == (0.15, 0.15) and image.spacing_source == "ImagerPixelSpacing"
    assert (image.presentation_intent, image.view_position, image.image_laterality) == (
        "FOR PRESENTATION", "PA", "U")
    assert image.patient_orientation == "L\\F"
    assert not image.inverted and "PixelData" not in image.header


def test_load_image_monochrome1_inverted_to_its_monochrome2_twin() -> None:
    mono2 = _radiograph("MONOCHROME2")
    mono1 = copy.deepcopy(mono2)
    mono1.PhotometricInterpretation = "MONOCHROME1"
    stored = np.frombuffer(mono2.PixelData, np.uint16).reshape(40, 30)
    mono1.PixelData = (4095 - stored).astype(np.uint16).tobytes()

    a, b = load_image(mono2), load_image(mono1)

    assert b.inverted and not a.inverted
    np.testing.assert_array_equal(a.array, b.array)
    raw = load_image(mono1, invert_monochrome1=False)
    np.testing.assert_array_equal(raw.array, 4095 - a.array)


def test_load_image_applies_the_window_only_when_asked() -> None:
    ds = _radiograph()
    plain = load_image(ds)
    windowed = load_image(ds, voi=VoiValues.WINDOW)

    assert plain.array.max() > 1500  # stored values
    # outside the window (750..1250) everything clips to the ends of the output range
    low, high = windowed.array.min(), windowed.array.max()
    assert set(np.unique(windowed.array[plain.array < 700])) == {low}
    assert set(np.unique(windowed.array[plain.array > 1300])) == {high}
    with pytest.raises(ValueError):
        load_image(ds, voi="gamma")


def test_load_image_pixel_spacing_wins_over_imager_pixel_spacing() -> None:
    ds = _radiograph()
    ds.PixelSpacing = [0.14, 0.14]

    assert load_image(ds).spacing_source == "PixelSpacing"


def test_load_image_refuses_multi_frame() -> None:
    ds = _radiograph()
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2

    with pytest.raises(InferenceError, match="multi-frame"):
        load_image(ds)


def test_real_radiograph(tmp_path: Path) -> None:
    ds = dcmread(REAL_DX)

    image = load_image(ds)

    assert is_projection(ds)
    assert image.modality == "DX" and image.shape == (int(ds.Rows), int(ds.Columns))
    assert image.pixel_spacing is not None
    assert image_attributes(ds)["photometric_interpretation"] in ("MONOCHROME1", "MONOCHROME2")


def test_ct_slice_is_not_a_projection(study: PhantomStudy) -> None:
    assert not is_projection(study.datasets[0])
    assert load_image(study.datasets[0]).shape == (128, 128)
