"""The bundled 3D demo through the running node: a CT phantom sent with dcmtk's storescu,
its sliding-window SEG stored on the original study in a real PACS (Orthanc), read back by
dcmqi's ``segimage2itkimage`` and compared with the phantom's ground truth in patient
space."""

from __future__ import annotations

import io
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from nodeutil import NodeProcess, free_port, storescu, wait_for, write_study
from peers import ORTHANC, orthanc_get, start_orthanc
from pydicom import dcmread

from dicomnode.dicom.phantom import make_ct_study

SimpleITK = pytest.importorskip("SimpleITK")
SEGIMAGE2ITK = str(Path(sys.executable).with_name("segimage2itkimage"))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(SEGIMAGE2ITK).exists() or not Path(ORTHANC).exists(),
                       reason="needs dcmqi (segimage2itkimage) and Orthanc"),
]


def _seg_instances(pacs) -> list[bytes]:  # noqa: ANN001 - peers.Receiver
    out = []
    for iid in orthanc_get(pacs, "/instances"):
        tags = orthanc_get(pacs, f"/instances/{iid}/simplified-tags")
        if tags.get("Modality") == "SEG":
            with urllib.request.urlopen(
                    f"http://127.0.0.1:{pacs.http_port}/instances/{iid}/file", timeout=30) as r:
                out.append(r.read())
    return out


def _truth_image(study) -> object:  # noqa: ANN001 - PhantomStudy
    """The phantom's lesion mask as a SimpleITK image in the CT's patient geometry."""
    first = study.datasets[0]
    s = study.spec
    img = SimpleITK.GetImageFromArray(study.mask.astype(np.uint8))  # (z, y, x) -> x, y, z
    img.SetSpacing((s.pixel_spacing_mm, s.pixel_spacing_mm, s.slice_thickness_mm))
    img.SetOrigin(tuple(float(v) for v in first.ImagePositionPatient))
    img.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))  # ImageOrientationPatient 1\0\0\0\1\0
    return img


def test_demo3d_seg_read_by_dcmqi_matches_the_phantom(tmp_path: Path) -> None:
    # pixel spacing and slice thickness off the network's 1.5 x 1.5 x 3 mm grid: the SEG
    # must come back on the CT's own grid, resampled and unpadded
    study = make_ct_study(seed=9301, n_slices=28, rows=150, columns=140,
                          pixel_spacing_mm=1.3, slice_thickness_mm=3.5, n_lesions=3,
                          patient_id="PAT-DEMO3D-1", accession_number="ACC-D3-1")
    assert study.mask.any()
    files = write_study(study, tmp_path / "src")
    node_port = free_port()
    pacs = start_orthanc(tmp_path / "orthanc",
                         modalities={"dicomnode": ["DICOMNODE", "127.0.0.1", node_port]})
    node = NodeProcess(tmp_path / "node", {
        "scp": {"port": node_port},
        "peers": {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.port,
                           "allow_store": False}},
        "results": {"destinations": ["pacs"], "sr": False},
        # the 3D demo alone (the default rules run the 2D demo on CT)
        "routing": {"rules": [{"name": "demo-ct-3d", "models": ["demo-lesion-3d"],
                               "modality": "CT", "min_slices": 8}]},
    })
    try:
        with node:
            assert storescu(node.port, files).returncode == 0
            [seg_bytes] = wait_for(lambda: _seg_instances(pacs) or None, 240, 1.0)
    finally:
        pacs.stop()
    seg = dcmread(io.BytesIO(seg_bytes))
    assert seg.StudyInstanceUID == study.study_instance_uid
    assert seg.PatientID == "PAT-DEMO3D-1"
    [segment] = seg.SegmentSequence
    assert segment.SegmentLabel == "Lesion"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"
    assert "demo-lesion-3d" in str(seg.get("SeriesDescription", "")) + str(
        getattr(seg, "ContentDescription", "")) + str(seg.to_json_dict())

    seg_path = tmp_path / "seg.dcm"
    seg_path.write_bytes(seg_bytes)
    out_dir = tmp_path / "dcmqi"
    out_dir.mkdir()
    res = subprocess.run([SEGIMAGE2ITK, "--inputDICOM", str(seg_path), "--outputDirectory",
                          str(out_dir), "-t", "nrrd"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    [nrrd] = sorted(out_dir.glob("*.nrrd"))
    seg_img = SimpleITK.ReadImage(str(nrrd))
    # the SEG's own geometry, as dcmqi reconstructs it, is the CT's
    truth = _truth_image(study)
    assert np.allclose(seg_img.GetSpacing(), truth.GetSpacing(), atol=1e-3)
    assert np.allclose(seg_img.GetDirection(), truth.GetDirection(), atol=1e-6)
    # both on the CT's grid: the SEG resampled there through its geometry (nearest, 0 outside)
    on_ct = SimpleITK.Resample(seg_img, truth, SimpleITK.Transform(),
                               SimpleITK.sitkNearestNeighbor, 0, SimpleITK.sitkUInt8)
    got = SimpleITK.GetArrayFromImage(on_ct) > 0
    want = study.mask > 0
    dice = 2 * (got & want).sum() / (got.sum() + want.sum())
    assert dice >= 0.8, f"Dice {dice:.3f} of the dcmqi-read SEG against the phantom"
