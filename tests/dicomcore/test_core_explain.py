"""Explanation maps: the Parametric Map opens with highdicom and lines up with the
classified image; the rendered key image is a valid Secondary Capture that references it."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from coretools import ALGORITHM, DEVICE, assert_valid
from pydicom import dcmread

from dicomnode.dicom.explain import build_explanation_map, build_key_image, render_overlay
from dicomnode.dicom.image import load_image
from dicomnode.dicom.radiograph import make_chest_radiograph
from dicomnode.dicom.sources import surrogate_frame_of_reference

WHEN = dt.datetime(2026, 12, 6, 10, 30, 0)


def _map(rows: int, cols: int) -> np.ndarray:
    m = np.zeros((rows, cols), np.float32)
    m[100:130, 40:70] = np.linspace(0.05, 0.6, 30, dtype=np.float32)[None, :]
    m[10:20, 200:210] = -0.1  # hiding this region raised the probability
    return m


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_parametric_map_lines_up_with_the_classified_image(tmp_path: Path,
                                                           photometric: str) -> None:
    src = make_chest_radiograph(seed=19010, photometric=photometric).dataset
    values = _map(int(src.Rows), int(src.Columns))
    pm = build_explanation_map(
        src, values, label="Nodule", method="occlusion sensitivity", algorithm=ALGORITHM,
        device=DEVICE, series_instance_uid="1.2.826.0.1.3680043.10.511.8.1",
        sop_instance_uid="1.2.826.0.1.3680043.10.511.8.2", series_number=9003,
        content_datetime=WHEN)
    back = assert_valid(pm, tmp_path / "pm.dcm")
    parsed = hd.pm.ParametricMap.from_dataset(back)
    # same grid: one frame of the image's rows and columns, the values as given
    assert (int(back.Rows), int(back.Columns), int(back.NumberOfFrames)) == \
        (int(src.Rows), int(src.Columns), 1)
    assert np.allclose(parsed.pixel_array.reshape(values.shape), values)
    # the map is about this image, on its own grid and (surrogate) frame of reference
    [derivation] = back.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence
    assert derivation.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert back.FrameOfReferenceUID == surrogate_frame_of_reference(str(src.SeriesInstanceUID))
    spacing = back.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert [float(v) for v in spacing] == [float(v) for v in src.ImagerPixelSpacing]
    mapping = back.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert "Nodule" in mapping.LUTExplanation
    first = float(mapping.DoubleFloatRealWorldValueFirstValueMapped)
    assert first == pytest.approx(float(values.min()))
    assert back.PatientID == src.PatientID and back.StudyInstanceUID == src.StudyInstanceUID


def test_key_image_shows_the_map_on_the_image_and_references_it(tmp_path: Path) -> None:
    src = make_chest_radiograph(seed=19011, photometric="MONOCHROME1").dataset
    values = _map(int(src.Rows), int(src.Columns))
    display = load_image(src, invert_monochrome1=True, voi="window").array
    rendered = render_overlay(display, values)
    sc = build_key_image(src, rendered, description="demo: Nodule 0.91", device=DEVICE,
                         series_instance_uid="1.2.826.0.1.3680043.10.511.8.3",
                         sop_instance_uid="1.2.826.0.1.3680043.10.511.8.4", series_number=9004,
                         content_datetime=WHEN)
    back = assert_valid(sc, tmp_path / "key.dcm")
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    pixels = dcmread(tmp_path / "key.dcm").pixel_array
    assert pixels.shape == (int(src.Rows), int(src.Columns), 3)
    # inside the map's strongest region the overlay is coloured (red over green over
    # blue); where the map is zero or negative the image stays grey
    hot = pixels[100:130, 60:70].astype(int)
    assert (hot[..., 0] > hot[..., 2] + 60).all()
    cold = pixels[10:20, 200:210].astype(int)
    assert (cold[..., 0] == cold[..., 2]).all() and (cold[..., 1] == cold[..., 2]).all()


def test_a_map_that_does_not_fit_the_image_is_refused() -> None:
    src = make_chest_radiograph(seed=19012).dataset
    with pytest.raises(ValueError, match="shape"):
        build_explanation_map(src, np.zeros((10, 10), np.float32), label="Nodule",
                              method="occlusion", algorithm=ALGORITHM, device=DEVICE,
                              series_instance_uid="1.2.3", sop_instance_uid="1.2.4",
                              series_number=1)
