"""The offline ``dicomnode deid`` over real-world files leaks none of their identifiers.

Two corpora (``corpus.py``): the subset vendored in ``tests/data/realworld`` (always)
and a sample of the public collection in ``../shared/realworld`` (skipped with the
reason when it is not there): one file of up to four series (or objects) of every
input class, so that the run stays under a minute. Every output file, and everything the
command prints, is grepped for each input file's Patient's Name (and its components),
Patient ID, Patient's Birth Date and instance UIDs (Study, Series, SOP Instance, Frame
of Reference, and every referenced instance UID). ``--include-at-risk`` writes the
at-risk objects too, so that their headers are checked as well; a second run without
it must hold them back and say why.
"""

from __future__ import annotations

import collections
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
from corpus import VENDORED, CorpusFile, extract_shared, load_manifest
from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.uid import UID_dictionary

SECRET = "a-fixed-test-secret-of-at-least-32-chars!"
PER_CLASS = 4  # series (or single objects) per input class of the shared collection
# Values too generic to mean anyone (an empty or placeholder name in public test data)
# would match unrelated bytes; they are not identifiers of a person.
GENERIC = {"ANONYMOUS", "ANONYMIZED", "ANON", "UNKNOWN", "NONE", "TEST", "PATIENT", "PHANTOM"}


def _sample(files: list[CorpusFile]) -> list[CorpusFile]:
    groups: dict[tuple[str, str], list[CorpusFile]] = collections.defaultdict(list)
    for f in files:
        if f.valid and f.path.is_file():
            groups[(f.cls, f.series if f.series not in ("", "-") else f.id)].append(f)
    taken: collections.Counter[str] = collections.Counter()
    out = []
    for (cls, _series), fs in sorted(groups.items()):
        if taken[cls] < PER_CLASS:
            taken[cls] += 1
            out.append(fs[0])  # one file of each series
    return out


def _technical_values(ds) -> set[str]:  # noqa: ANN001
    """Values of attributes the profile keeps on purpose (numbers, technique text).

    Public test data was anonymised by writing one placeholder everywhere: dicom2nifti's
    files have Patient's Name *and* Sequence Name "dicom2nifti", highdicom's DX has
    Patient ID *and* Series Number "123456". Such a value is the data's own placeholder,
    not a person's identifier; it stays in the kept attribute and is not scanned for.
    """
    text = resources.files("dicomnode.dicom.deid").joinpath("data", "keep_text.txt")
    keep = {
        tag_for_keyword(w)
        for line in text.read_text("utf-8").splitlines()
        for w in line.split("#", 1)[0].split()
    }
    return {
        str(e.value).strip()
        for e in ds
        if e.VR in _NUMERIC or e.tag in keep
    }


_NUMERIC = {"IS", "DS", "US", "UL", "SS", "SL", "FL", "FD", "UV", "SV"}


def _identifiers(path: Path) -> set[str]:
    """The identifying values of one input file (see the module docstring)."""
    ds = dcmread(path, stop_before_pixels=True, force=True)
    out: set[str] = set()
    name = str(ds.get("PatientName", "") or "")
    for value in [name, *name.replace("=", "^").split("^")]:
        value = value.strip()
        if len(value) >= 4 and value.upper() not in GENERIC:
            out.add(value)
    for kw in ("PatientID", "PatientBirthDate"):
        value = str(ds.get(kw, "") or "").strip()
        if len(value) >= 4 and value.upper() not in GENERIC:
            out.add(value)
    for elem in ds.iterall():
        if elem.VR == "UI" and elem.value and elem.keyword.endswith(
            ("InstanceUID", "FrameOfReferenceUID")
        ):
            values = elem.value if elem.VM > 1 else [elem.value]
            out |= {str(v) for v in values if str(v) not in UID_dictionary}
    return out


def _corpus(name: str, tmp_path: Path) -> list[CorpusFile]:
    if name == "vendored":
        return [f for f in load_manifest(VENDORED) if f.valid and f.path.is_file()]
    root = extract_shared(tmp_path / "shared")
    if root is None:
        pytest.skip("../shared/realworld is not present (the public real-world collection)")
    return _sample(load_manifest(root))


def _deid(tmp_path: Path, files: list[CorpusFile], out: str, *args: str
          ) -> subprocess.CompletedProcess[bytes]:
    src = tmp_path / "in"
    if not src.exists():
        src.mkdir()
        for f in files:
            (src / f"{f.id}.dcm").symlink_to(f.path.resolve())
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'data_dir = "{tmp_path / "data"}"\n[deid]\nsecret = "{SECRET}"\n')
    return subprocess.run(
        [sys.executable, "-m", "dicomnode", "deid", str(src), "--out", str(tmp_path / out),
         "--config", str(cfg), *args],
        capture_output=True, timeout=300,
    )


@pytest.mark.parametrize("corpus_name", ["vendored", "shared"])
def test_offline_deid_leaks_no_identifier_of_real_files(corpus_name: str, tmp_path: Path):
    files = _corpus(corpus_name, tmp_path)
    assert len(files) >= 20
    identifiers = set().union(*(_identifiers(f.path) for f in files))
    placeholders = set().union(
        *(_technical_values(dcmread(f.path, stop_before_pixels=True)) for f in files)
    )
    identifiers -= placeholders
    assert len(identifiers) > len(files)  # UIDs at least: the scan has something to find
    res = _deid(tmp_path, files, "out", "--include-at-risk")
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-3000:]
    outputs = sorted((tmp_path / "out").glob("*.dcm"))
    summary = res.stdout.decode().strip().splitlines()[-1]
    assert summary.startswith(f"{len(files)} de-identified"), summary
    # every valid file comes out (names by SOP Instance UID: copies of one object merge)
    sops = {str(dcmread(f.path, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert len(outputs) == len(sops)
    blobs = [("stdout", res.stdout), ("stderr", res.stderr)] + [
        (p.name, p.read_bytes()) for p in outputs
    ]
    leaks = sorted(
        (value, where)
        for value in identifiers
        for where, blob in blobs
        if value.encode() in blob
    )
    assert leaks == [], leaks

    # without --include-at-risk the at-risk objects stay out, counted with their reason
    held = _deid(tmp_path, files, "out-default")
    assert held.returncode == 0
    written = len(list((tmp_path / "out-default").glob("*.dcm")))
    last = held.stdout.decode().strip().splitlines()[-1]
    flagged = int(summary.split(", ")[2].split()[0])
    if flagged:
        assert f"{flagged} at risk not written" in last, last
        assert last.startswith(f"{len(files) - flagged} de-identified") and written < len(outputs)
    else:
        assert written == len(outputs) and "not written" not in last
