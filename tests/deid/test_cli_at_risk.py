"""``dicomnode deid`` follows the node's quarantine policy (issue 16).

At-risk objects (ultrasound, secondary capture, burned-in annotation, SR, encapsulated
PDF) are not written unless a mask rule cleaned them or ``--include-at-risk`` is
given; with ``deid.quarantine_risky = false`` (the node then stores them too) they are
written, flagged. The summary counts what was held back and why.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from deidutil import ct, load
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from test_pixels import ultrasound

SECRET = "a-fixed-test-secret-of-at-least-32-chars!"


def _pdf() -> Dataset:
    ds = ct()
    for kw in ("Rows", "Columns", "PixelData", "BitsAllocated", "BitsStored", "HighBit",
               "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation"):
        delattr(ds, kw)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.Modality = "DOC"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4 nothing "
    return ds


def _inputs(folder: Path) -> dict[str, Path]:
    """One clean CT and five at-risk objects, by name."""
    folder.mkdir()
    sets = {
        "ct": ct(),
        "us-burned-in": ultrasound(),
        "us-unknown": ultrasound(burned_in=None),
        "sc": load("SC_rgb.dcm"),
        "sr": load("test-SR.dcm"),
        "pdf": _pdf(),
    }
    paths = {}
    for name, ds in sets.items():
        ds.SOPInstanceUID = generate_uid()  # ct() is one slice: each object its own
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths[name] = path
    return paths


def _run(tmp_path: Path, src: Path, out: str, *args: str, extra_config: str = ""
         ) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / f"{out}.toml"
    cfg.write_text(f'data_dir = "{tmp_path / "data"}"\n[deid]\nsecret = "{SECRET}"\n'
                   + extra_config)
    return subprocess.run(
        [sys.executable, "-m", "dicomnode", "deid", str(src), "--out", str(tmp_path / out),
         "--config", str(cfg), *args],
        capture_output=True, text=True, timeout=120,
    )


def _written(folder: Path) -> list[str]:
    return sorted(str(dcmread(p, stop_before_pixels=True).SOPClassUID)
                  for p in folder.glob("*.dcm"))


def test_at_risk_objects_not_written_and_counted(tmp_path: Path) -> None:
    paths = _inputs(tmp_path / "in")
    res = _run(tmp_path, tmp_path / "in", "out")
    assert res.returncode == 0, res.stderr
    written = _written(tmp_path / "out")
    assert written == [str(dcmread(paths["ct"]).SOPClassUID)]  # the CT only
    summary = res.stdout.strip().splitlines()[-1]
    assert summary.startswith("1 de-identified") and "0 flagged" in summary
    assert "5 at risk not written" in summary
    for reason in ("risky-sop-class", "structured-content", "encapsulated-document",
                   "burned-in-annotation"):
        assert reason in summary
    for name in ("us-burned-in", "us-unknown", "sc", "sr", "pdf"):
        assert f"{paths[name]}: at risk (" in res.stderr and "not written" in res.stderr


def test_include_at_risk_writes_them_flagged(tmp_path: Path) -> None:
    _inputs(tmp_path / "in")
    res = _run(tmp_path, tmp_path / "in", "out", "--include-at-risk")
    assert res.returncode == 0, res.stderr
    assert len(_written(tmp_path / "out")) == 6
    assert res.stdout.strip().splitlines()[-1].startswith("6 de-identified")
    assert "5 flagged" in res.stdout and "not written" not in res.stdout


def test_node_policy_off_writes_them_flagged(tmp_path: Path) -> None:
    _inputs(tmp_path / "in")
    res = _run(tmp_path, tmp_path / "in", "out", extra_config="quarantine_risky = false\n")
    assert res.returncode == 0, res.stderr
    assert len(_written(tmp_path / "out")) == 6 and "5 flagged" in res.stdout


def test_mask_rule_cleans_ultrasound_so_it_is_written(tmp_path: Path) -> None:
    paths = _inputs(tmp_path / "in")
    rule = ('[[deid.mask_rules]]\nmodality = "US"\nkeep_ultrasound_regions = true\n')
    res = _run(tmp_path, tmp_path / "in", "out", extra_config=rule)
    assert res.returncode == 0, res.stderr
    us_class = str(dcmread(paths["us-burned-in"]).SOPClassUID)
    written = _written(tmp_path / "out")
    assert written.count(us_class) == 2  # both ultrasounds, masked
    for p in (tmp_path / "out").glob("*.dcm"):
        ds = dcmread(p)
        if str(ds.SOPClassUID) == us_class:
            assert ds.BurnedInAnnotation == "NO"
            assert "113101" in [str(c.CodeValue) for c in ds.DeidentificationMethodCodeSequence]
    assert "3 at risk not written" in res.stdout  # SC, SR, PDF still held back
    assert "us-burned-in.dcm: at risk" not in res.stderr
