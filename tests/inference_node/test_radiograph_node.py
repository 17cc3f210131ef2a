"""The radiograph demo through the running node and a real PACS (Orthanc): a positive and
a negative chest film, and a MONOCHROME1 copy of the positive, each get a TID 1500 report
on their original study; positives also get the explanation as a Parametric Map and a key
image. Every object dciodvfy-clean; the report's present/absent matches the phantom; the
map lines up with the source image and peaks on the planted nodule."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from nodeutil import NodeProcess, free_port, storescu, wait_for
from peers import Receiver, orthanc_get, start_orthanc
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomnode.dicom.radiograph import make_chest_radiograph

pytestmark = pytest.mark.slow
TOKEN = "radiograph-test-token-0123456789"
DCIODVFY = str(Path(sys.executable).with_name("dciodvfy"))
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
PM_CLASS = "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture


def _orthanc_datasets(pacs: Receiver) -> list[tuple[Dataset, bytes]]:
    out = []
    for i in orthanc_get(pacs, "/instances"):
        url = f"http://127.0.0.1:{pacs.http_port}/instances/{i}/file"
        with urllib.request.urlopen(url, timeout=30) as r:
            data = r.read()
        out.append((dcmread(io.BytesIO(data)), data))
    return out


def _get(port: int, path: str) -> bytes:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()


def _items(ds: Dataset) -> list[Dataset]:
    """Every content item of an SR tree, depth first."""
    out = []
    for item in getattr(ds, "ContentSequence", []):
        out.append(item)
        out.extend(_items(item))
    return out


def _finding(sr: Dataset) -> tuple[str, float]:
    """The report's qualitative evaluation of the nodule and its probability."""
    values = [it.ConceptCodeSequence[0].CodeMeaning for it in _items(sr)
              if it.ValueType == "CODE"  # the label's type code: (786838002, SCT) nodule
              and it.ConceptNameCodeSequence[0].CodeValue == "786838002"]
    probs = [float(it.MeasuredValueSequence[0].NumericValue) for it in _items(sr)
             if it.ValueType == "NUM" and it.ConceptNameCodeSequence[0].CodeValue == "122157"]
    # the group's evaluation and the report-level summary's
    assert len(values) == 2 and len(set(values)) == 1 and len(probs) == 1, (values, probs)
    return values[0], probs[0]


def test_radiographs_get_findings_and_explanations_on_their_original_studies(
        tmp_path: Path) -> None:
    node_port = free_port()
    pacs = start_orthanc(tmp_path / "orthanc",
                         modalities={"dicomnode": ["DICOMNODE", "127.0.0.1", node_port]})
    node = NodeProcess(tmp_path / "node", {
        "scp": {"port": node_port},
        "peers": {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.port,
                           "allow_store": False}},
        "results": {"destinations": ["pacs"], "retry_base_s": 0.5, "retry_max_s": 2.0},
        "api": {"enabled": True, "port": (api_port := free_port()), "token": TOKEN},
    })
    films = {
        "CXR-POS": make_chest_radiograph(seed=19501, nodule=True, patient_id="CXR-POS"),
        "CXR-NEG": make_chest_radiograph(seed=19502, nodule=False, patient_id="CXR-NEG"),
        "CXR-MONO1": make_chest_radiograph(seed=19501, nodule=True, patient_id="CXR-MONO1",
                                           photometric="MONOCHROME1"),
    }
    files = []
    for pid, ph in films.items():
        path = tmp_path / "src" / f"{pid}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ph.dataset.save_as(path, enforce_file_format=True)
        files.append(path)
    try:
        node.cli("db", "upgrade")
        node.start()
        assert storescu(node.port, files).returncode == 0

        def final() -> list[dict] | None:
            studies = node.studies()
            done = [s for s in studies if s["outcome"] == "results_sent"]
            return studies if len(done) == 3 else None

        studies = wait_for(final, 240, 1.0)
        received = _orthanc_datasets(pacs)
        pages = {s["id"]: _get(api_port, f"/ui/studies/{s['id']}") for s in studies}
        shown = [re.findall(rb'src="(/ui/studies/[^"]+/explain/[^"]+\.png)"', page)
                 for page in pages.values()]
        pngs = [_get(api_port, links[0].decode()) for links in shown if links]
    finally:
        node.stop()
        pacs.stop()

    by_patient: dict[str, dict[str, list[Dataset]]] = {}
    for ds, data in received:
        kind = {SR_CLASS: "SR", PM_CLASS: "PM", SC_CLASS: "KEY"}.get(ds.SOPClassUID)
        if kind is None:
            continue
        path = tmp_path / "out" / f"{ds.SOPInstanceUID}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        res = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True,
                             timeout=120)
        errors = [ln for ln in (res.stdout + res.stderr).splitlines()
                  if ln.startswith("Error")]
        assert errors == [], f"dciodvfy on {kind}: {errors}"
        by_patient.setdefault(ds.PatientID, {}).setdefault(kind, []).append(ds)

    assert set(by_patient) == set(films), [(ds.PatientID, ds.SOPClassUID, ds.StudyInstanceUID)
                                           for ds, _ in received]
    probs = {}
    for pid, ph in films.items():
        got = by_patient[pid]
        src = ph.dataset
        [sr] = got["SR"]
        # on the original study, referencing the original image
        assert sr.StudyInstanceUID == src.StudyInstanceUID
        refs = [it.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for it in _items(sr)
                if it.ValueType == "IMAGE"]
        assert refs and set(refs) == {src.SOPInstanceUID}
        value, probs[pid] = _finding(sr)
        assert value == ("Present" if ph.has_nodule else "Absent"), pid
        if not ph.has_nodule:
            assert "PM" not in got and "KEY" not in got  # nothing to explain
            continue
        [pm_ds] = got["PM"]
        [key] = got["KEY"]
        pm = hd.pm.ParametricMap.from_dataset(pm_ds)
        assert pm.StudyInstanceUID == src.StudyInstanceUID
        [ref] = pm.SharedFunctionalGroupsSequence[0].DerivationImageSequence[0]\
            .SourceImageSequence if "DerivationImageSequence" in \
            pm.SharedFunctionalGroupsSequence[0] else pm.SourceImageSequence
        assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
        # the map is on the source's pixel grid and peaks on the nodule
        values = pm.pixel_array.reshape(src.Rows, src.Columns)
        mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        assert values.shape == (src.Rows, src.Columns)
        peak = np.unravel_index(int(np.argmax(values)), values.shape)
        assert ph.nodule[peak], f"{pid}: map peak {peak} outside the nodule"
        assert float(mapping.DoubleFloatRealWorldValueLastValueMapped) > 0
        assert key.StudyInstanceUID == src.StudyInstanceUID
        assert key.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert key.Rows == src.Rows and key.PhotometricInterpretation == "RGB"
    # the dashboard shows the explanation over the film for the two positives only
    assert sorted(len(links) for links in shown) == [0, 1, 1]
    assert all(png.startswith(b"\x89PNG") for png in pngs)
    # the same film stored MONOCHROME1 gives the same probability
    assert probs["CXR-MONO1"] == pytest.approx(probs["CXR-POS"], abs=1e-3)
