"""Per-finding results through the running node: one TID 1411 group per lesion in the SR
that reaches the PACS (Orthanc), read back by dcmqi's tid1500reader, with tracking UIDs
that survive a late series (a new study version, a re-run of the model)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from nodeutil import NodeProcess, free_port, storescu, wait_for, write_study
from peers import Receiver, orthanc_get, start_orthanc
from pydicom import dcmread

from dicomnode.dicom.phantom import Lesion, make_ct_study

TID1500READER = Path(sys.executable).with_name("tid1500reader")
DCIODVFY = Path(sys.executable).with_name("dciodvfy")
STUDY_UID = "2.25.314159265358979323846264338327950288"
# (z, y, x) voxel centres at 3 mm slices, 1.5 mm pixels; radii (z, y, x) in mm
LESIONS = (
    ((8, 50, 45), (9.0, 10.0, 8.0)),
    ((18, 80, 70), (12.0, 8.0, 9.0)),
    ((22, 45, 85), (7.0, 7.0, 7.0)),
)


def rows(node: NodeProcess, sql: str) -> list[tuple]:
    con = sqlite3.connect(f"file:{node.data_dir / 'dicomnode.db'}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def orthanc_file(pacs: Receiver, instance_id: str) -> bytes:
    with urllib.request.urlopen(
            f"http://127.0.0.1:{pacs.http_port}/instances/{instance_id}/file", timeout=30) as r:
        return r.read()


@pytest.fixture
def pacs_and_node(tmp_path: Path):
    node_port = free_port()
    pacs = start_orthanc(tmp_path / "orthanc",
                         modalities={"dicomnode": ["DICOMNODE", "127.0.0.1", node_port]})
    node = NodeProcess(tmp_path / "node", {
        "scp": {"port": node_port},
        "peers": {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.port,
                           "allow_store": False}},
        "results": {"destinations": ["pacs"], "retry_base_s": 0.5, "retry_max_s": 2.0},
    })
    yield pacs, node
    if node.proc is not None and node.proc.poll() is None:
        node.stop()
    pacs.stop()


def _study(seed: int, series_number: int, thickness: float):
    # the same lesions at the same patient positions, whatever the slice thickness
    lesions = tuple(Lesion((z * 3.0 / thickness, y, x), r) for (z, y, x), r in LESIONS)
    return make_ct_study(seed=seed, study_instance_uid=STUDY_UID, series_number=series_number,
                         n_slices=int(96 / thickness), slice_thickness_mm=thickness,
                         lesions=lesions, patient_id="PAT-FINDINGS")


def _sr_groups(pacs, sop_instance_uid: str, tmp_path: Path) -> list[dict]:
    [iid] = [i for i in orthanc_get(pacs, "/instances")
             if orthanc_get(pacs, f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"]
             == sop_instance_uid]
    path = tmp_path / f"{sop_instance_uid}.dcm"
    path.write_bytes(orthanc_file(pacs, iid))
    check = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True,
                           timeout=120)
    errors = [ln for ln in (check.stdout + check.stderr).splitlines() if ln.startswith("Error")]
    assert errors == [], errors
    out = tmp_path / f"{sop_instance_uid}.json"
    proc = subprocess.run([str(TID1500READER), "--inputDICOM", str(path), "--outputMetadata",
                           str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    groups = json.loads(out.read_text())["Measurements"]
    # every TID 1411 group of the SR was read
    sr = dcmread(path)
    [imaging] = [i for i in sr.ContentSequence
                 if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    assert len(groups) == len(imaging.ContentSequence)
    return groups


def _volume(group: dict) -> float:
    [v] = [float(m["value"]) for m in group["measurementItems"]
           if m["quantity"]["CodeMeaning"] == "Volume"]
    return v


@pytest.mark.slow
def test_three_lesions_three_tracked_groups_kept_across_a_late_series(
        pacs_and_node, tmp_path: Path) -> None:
    pacs, node = pacs_and_node
    first = _study(seed=1, series_number=2, thickness=3.0)
    assert len(first.lesions) == 3
    node.start()
    assert storescu(node.port, write_study(first, tmp_path / "a")).returncode == 0
    wait_for(lambda: rows(node, "select count(*) from outbox where status = 'sent'")[0][0] == 2,
             120)
    [(sr1,)] = rows(node, "select sop_instance_uid from outbox where kind = 'SR'")
    groups = _sr_groups(pacs, sr1, tmp_path)
    totals = [g for g in groups if g["TrackingIdentifier"] == "Lesion"]
    per_finding = [g for g in groups if g["TrackingIdentifier"] != "Lesion"]
    assert len(totals) == 1
    assert sorted(g["TrackingIdentifier"] for g in per_finding) == [
        "Lesion 1", "Lesion 2", "Lesion 3"]
    uids1 = {g["TrackingIdentifier"]: g["TrackingUniqueIdentifier"] for g in per_finding}
    assert len(set(uids1.values())) == 3
    assert totals[0]["TrackingUniqueIdentifier"] not in uids1.values()
    # each finding's volume within 10 % of its lesion's (an ellipsoid), the nearest by size
    truth = sorted(4 / 3 * np.pi * np.prod(r) for _, r in LESIONS)
    measured = sorted(_volume(g) for g in per_finding)
    for got, want in zip(measured, truth, strict=True):
        assert got == pytest.approx(want, rel=0.10)
    assert _volume(totals[0]) == pytest.approx(sum(measured), rel=1e-6)

    # A late series (thinner slices, other noise and distractors, same lesions): a new
    # study version, the model runs again, a new SR supersedes the first.
    late = _study(seed=2, series_number=3, thickness=2.0)
    assert storescu(node.port, write_study(late, tmp_path / "b")).returncode == 0
    wait_for(lambda: rows(node, "select count(*) from outbox where status = 'sent'")[0][0] == 4,
             180)
    [(sr2,)] = rows(node, "select sop_instance_uid from outbox "
                          "where kind = 'SR' and study_version = 2")
    assert sr2 != sr1
    groups2 = _sr_groups(pacs, sr2, tmp_path)
    uids2 = {g["TrackingIdentifier"]: g["TrackingUniqueIdentifier"] for g in groups2
             if g["TrackingIdentifier"] != "Lesion"}
    assert uids2 == uids1
    # the result rows carry the tracking data the next run matches against
    stored = rows(node, "select study_version, series_key, findings from inference_result "
                        "order by study_version")
    assert [v for v, _, _ in stored] == [1, 2]
    # the model ran on the late series: the findings moved (voxelisation), and matched
    assert stored[0][1] != stored[1][1]
    for _, _, findings in stored:
        assert {f["tracking_uid"] for f in json.loads(findings)} == set(uids1.values())
