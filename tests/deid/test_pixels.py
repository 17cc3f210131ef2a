"""deid.md section 6, pixel cases 85-95: risk flags and rectangle masking (113101)."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pytest
from deidutil import assert_absent, assert_iod_kept, ct, deidentifier, load, run
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from dicomnode.dicom.deid import MaskRule, Region, RiskFlag

US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
ROWS, COLUMNS = 40, 64  # not square: rows and columns cannot be confused (deid#59)


def ultrasound(frames: int = 1, burned_in: str | None = "YES") -> Dataset:
    """An RGB ultrasound image whose every pixel is non-zero, with one US region."""
    ds = ct()
    ds.SOPClassUID = US_MULTIFRAME if frames > 1 else US_IMAGE
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.Modality = "US"
    for kw in (
        "RescaleIntercept",
        "RescaleSlope",
        "RescaleType",
        "WindowCenter",
        "WindowWidth",
        "PixelSpacing",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "SliceThickness",
        "SliceLocation",
        "FrameOfReferenceUID",
        "KVP",
        "PositionReferenceIndicator",
    ):
        if kw in ds:
            delattr(ds, kw)
    ds.Rows, ds.Columns = ROWS, COLUMNS
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    rng = np.random.default_rng(7)
    shape = (frames, ROWS, COLUMNS, 3) if frames > 1 else (ROWS, COLUMNS, 3)
    ds.PixelData = rng.integers(1, 256, size=shape, dtype=np.uint8).tobytes()
    if frames > 1:
        ds.NumberOfFrames = frames
        ds.FrameIncrementPointer = 0x00181063
        ds.FrameTime = 33.3
    region = Dataset()
    region.RegionSpatialFormat, region.RegionDataType, region.RegionFlags = 1, 1, 0
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 10, 5
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = 50, 30
    region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3
    region.PhysicalDeltaX = region.PhysicalDeltaY = 0.01
    ds.SequenceOfUltrasoundRegions = Sequence([region])
    return ds


def pixels(data: bytes) -> np.ndarray:
    return dcmread(BytesIO(data)).pixel_array


def test_case_85_burned_in_yes_flagged_and_quarantined():
    ds = ct()
    ds.BurnedInAnnotation = "YES"
    result, _ = run(ds)
    assert RiskFlag.BURNED_IN_ANNOTATION in result.flags
    assert result.quarantine and not result.pixels_cleaned
    assert result.dataset.BurnedInAnnotation == "YES"
    plain, _ = run(ct())
    assert plain.flags == () and not plain.quarantine


def test_case_86_ultrasound_only_regions_kept():
    ds = ultrasound()
    before = ds.pixel_array.copy()
    input_bytes = ds.PixelData
    rule = MaskRule(modality="US", keep_ultrasound_regions=True)
    result, data = run(ds, deidentifier(mask_rules=(rule,)))
    assert ds.PixelData is input_bytes and ds.PlanarConfiguration == 0  # input untouched
    after = pixels(data)
    inside = (slice(5, 31), slice(10, 51))
    assert np.array_equal(after[inside], before[inside])
    outside = after.copy()
    outside[inside] = 0
    assert not outside.any()
    assert result.pixels_cleaned and not result.quarantine
    assert_iod_kept(ds, data)


def test_case_87_multiframe_every_frame_masked_not_scrambled():
    ds = ultrasound(frames=3)
    before = ds.pixel_array.copy()
    rule = MaskRule(regions=(Region(row=0, column=0, rows=4, columns=COLUMNS),))
    result, data = run(ds, deidentifier(mask_rules=(rule,)))
    after = pixels(data)
    assert after.shape == before.shape == (3, ROWS, COLUMNS, 3)
    assert not after[:, :4].any()
    assert np.array_equal(after[:, 4:], before[:, 4:])


def test_case_88_rectangle_orientation_on_non_square_image():
    ds = ultrasound()
    before = ds.pixel_array.copy()
    rule = MaskRule(regions=(Region(row=2, column=30, rows=3, columns=20),))
    _, data = run(ds, deidentifier(mask_rules=(rule,)))
    after = pixels(data)
    expected = before.copy()
    expected[2:5, 30:50] = 0
    assert np.array_equal(after, expected)


def test_case_89_rule_for_another_image_size_does_not_match():
    ds = ultrasound()
    rule = MaskRule(rows=COLUMNS, columns=ROWS, regions=(Region(0, 0, 4, 4),))
    result, data = run(ds, deidentifier(mask_rules=(rule,)))
    assert not result.pixels_cleaned and result.quarantine
    assert np.array_equal(pixels(data), ds.pixel_array)


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_dcmtk.dcm", "US1_J2KR.dcm", "SC_rgb_rle.dcm"])
def test_case_90_compressed_input_decoded_masked_written_uncompressed(name: str):
    ds = load(name)
    photometric, syntax = ds.PhotometricInterpretation, ds.file_meta.TransferSyntaxUID
    rule = MaskRule(regions=(Region(0, 0, 5, 7),))
    result, data = run(ds, deidentifier(mask_rules=(rule,)))
    assert ds.PhotometricInterpretation == photometric  # the input is not modified
    assert ds.file_meta.TransferSyntaxUID == syntax
    out = dcmread(BytesIO(data))
    assert result.pixels_cleaned
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert out.PhotometricInterpretation in ("RGB", "MONOCHROME1", "MONOCHROME2")
    arr = out.pixel_array
    frame = arr[0] if int(out.get("NumberOfFrames", 1)) > 1 else arr
    assert not frame[:5, :7].any() and frame.any()
    assert out.SOPInstanceUID == result.dataset.SOPInstanceUID  # not regenerated by decompress


def test_case_91_secondary_capture_flagged():
    ds = load("SC_rgb.dcm")
    result, _ = run(ds)
    assert RiskFlag.RISKY_SOP_CLASS in result.flags and result.quarantine
    screen = ct()
    screen.ImageType = ["DERIVED", "SECONDARY", "SCREEN SAVE"]
    assert RiskFlag.SCREEN_CAPTURE in run(screen)[0].flags


def test_case_92_burned_in_absent_on_risky_class_counts_as_yes():
    result, _ = run(ultrasound(burned_in=None))
    assert RiskFlag.BURNED_IN_ANNOTATION in result.flags
    result, _ = run(ultrasound(burned_in="NO"))  # the header flag is not evidence
    assert RiskFlag.BURNED_IN_ANNOTATION not in result.flags
    assert RiskFlag.RISKY_SOP_CLASS in result.flags and result.quarantine


def test_case_93_burned_in_no_and_113101_only_when_masked():
    ds = ultrasound()
    plain, _ = run(ds)
    assert plain.dataset.BurnedInAnnotation == "YES"
    assert "113101" not in plain.methods
    masked, data = run(ds, deidentifier(mask_rules=(MaskRule(regions=(Region(0, 0, 4, 4),)),)))
    out = dcmread(BytesIO(data))
    assert out.BurnedInAnnotation == "NO"
    assert "113101" in [i.CodeValue for i in out.DeidentificationMethodCodeSequence]


def test_case_94_face_photograph_flagged():
    result, _ = run(load("OT-PAL-8-face.dcm"))
    assert RiskFlag.RECOGNIZABLE_FEATURES in result.flags and result.quarantine


def test_case_95_encapsulated_pdf_flagged_document_replaced():
    ds = ct()
    for kw in (
        "Rows",
        "Columns",
        "PixelData",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "SamplesPerPixel",
        "PhotometricInterpretation",
    ):
        delattr(ds, kw)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.Modality = "DOC"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.DocumentTitle = "Report for PHI-MARK-0095"
    ds.EncapsulatedDocument = b"%PDF-1.4 Patient PHI-MARK-0095B "
    result, data = run(ds)
    assert RiskFlag.ENCAPSULATED_DOCUMENT in result.flags and result.quarantine
    assert_absent(data, ["PHI-MARK-0095", "PHI-MARK-0095B"])
