"""Real scanner data through a running node: every study ends in results or a stated reason.

Two corpora: the subset vendored in ``tests/data/realworld`` (always), and the whole
public collection in ``../shared/realworld`` when it is there (skipped with the reason
otherwise). Per input class (from each corpus's MANIFEST.tsv) the node must:

- store every valid object (C-STORE 0x0000);
- de-identify it, or quarantine it with a reason; nothing left identified in spool;
- for CT/MR series that make a volume (regular, tilted, gapped, 4D, Enhanced and Legacy
  Converted multi-frame) run a model and encode a SEG and an SR; the series it must
  refuse (Siemens MOSAIC, scattered slices) end with that reason;
- leave every study in a final outcome, none ``failed``, no dead-lettered job.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from corpus import VENDORED, BatchRun, CorpusFile, extract_shared, load_manifest, run_batch
from pydicom import dcmread

from dicomnode.dicom.pseudonym import Pseudonymizer

pytestmark = pytest.mark.slow


def _runs(root: Path, work: Path) -> list[BatchRun]:
    files = load_manifest(root)
    batches: dict[str, list[CorpusFile]] = {}
    for f in files:
        batches.setdefault(f.batch, []).append(f)
    return [run_batch(work, b, fs) for b, fs in sorted(batches.items())]


@pytest.fixture(scope="module")
def vendored(tmp_path_factory: pytest.TempPathFactory) -> list[BatchRun]:
    return _runs(VENDORED, tmp_path_factory.mktemp("vendored"))


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> list[BatchRun]:
    root = extract_shared(tmp_path_factory.mktemp("shared-corpus"))
    if root is None:
        pytest.skip("../shared/realworld is not present (the public real-world collection)")
    return _runs(root, tmp_path_factory.mktemp("shared"))


def _check(runs: list[BatchRun]) -> None:
    for run in runs:
        assert run.data_dir is not None
        p = Pseudonymizer((run.data_dir / "keys" / "node.key").read_bytes().strip())
        # stored: every valid object acknowledged
        refused = {f.orig_path: run.statuses.get(f.id) for f in run.files
                   if f.valid and run.statuses.get(f.id) != 0}
        assert not refused, f"batch {run.batch}: valid objects not stored: {refused}"
        # de-identified, or quarantined with a reason; never failed or left pending
        states = {r[0]: (r[1], r[2]) for r in run.instances}
        for f in run.files:
            sop_key = p.uid(str(dcmread(f.path, stop_before_pixels=True).SOPInstanceUID))
            state, error = states[sop_key]
            assert state in ("deidentified", "quarantined"), (f.orig_path, state, error)
            if state == "quarantined":
                assert error and error.startswith("quarantined:"), (f.orig_path, error)
        assert not run.spool_files, "identified copies left in spool"
        # every study final; no internal failure
        assert run.studies
        outcomes = {s["id"]: (s["outcome"], s["outcome_reason"]) for s in run.studies}
        failed = {k: v for k, v in outcomes.items() if v[0] == "failed"}
        assert not failed, f"batch {run.batch}: studies failed: {failed}"
        assert not run.failed_jobs, f"batch {run.batch}: dead-lettered jobs: {run.failed_jobs}"
        # CT/MR volumes: a model ran and the SEG and SR were encoded
        done = {r[2] for r in run.results if r[3] == "done"}
        study_of_series = {r[3]: r[4] for r in run.instances}
        for f in run.files:
            key = run.series_keys.get(f.series)
            if f.expects_results:
                assert key in done, f"no results for {f.orig_path} ({f.cls}): " + str(
                    outcomes.get(study_of_series.get(key)))
            elif f.expected_refusal is not None:
                outcome, reason = outcomes[study_of_series[key]]
                assert outcome in ("refused", "not_applicable"), (f.orig_path, outcome)
                assert f.expected_refusal in (reason or ""), (f.orig_path, reason)
        encoded = [s for s in run.studies if s["outcome"] == "results_held"]
        for s in encoded:
            objects = {o for e in (s["info"].get("encoded") or {}).values()
                       for o in e.get("objects", [])}
            assert objects == {"SEG", "SR"}, (s["id"], objects)


def test_vendored_real_data_reaches_results_or_a_reason(vendored: list[BatchRun]) -> None:
    _check(vendored)
    # the subset holds the hard cases: each of these must have produced results
    done = {r[2] for run in vendored for r in run.results if r[3] == "done"}
    hard = ("gantrytilting", "sliceincrement", "philips_enhanced/anatomical",
            "philips_enhanced/dti", "ge/dti", "hyperfine", "23x38x3/multiframe", "ct-3slice",
            "sliceorientation", "002_non_isotropic", "hitachi")
    for fragment in hard:
        keys = {run.series_keys.get(f.series) for run in vendored for f in run.files
                if fragment in f.orig_path}
        assert keys & done, f"{fragment}: no results"


def test_vendored_results_are_valid_dicom(vendored: list[BatchRun], tmp_path: Path) -> None:
    """dciodvfy finds no error in any SEG or SR made from real data."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dicomcore"))
    from coretools import dciodvfy

    objects = [f for run in vendored if run.data_dir is not None
               for f in (run.data_dir / "results").rglob("*.dcm")]
    assert len(objects) >= 2 * 11
    for path in objects:
        errors, _ = dciodvfy(path)
        assert not errors, (path.name, errors[:5])


def test_shared_real_world_collection(shared: list[BatchRun]) -> None:
    _check(shared)


def test_vendored_results_render_on_the_dashboard(vendored: list[BatchRun]) -> None:
    """The study page's thumbnails work for results on multi-frame and resampled sources."""
    from dicomnode.api.services import ApiServices
    from dicomnode.api.thumbnails import render_result
    from dicomnode.app import open_database
    from dicomnode.config import load_settings

    [run] = vendored
    assert run.data_dir is not None
    settings = load_settings(run.data_dir.parent / "node.toml")
    engine, sessions = open_database(settings, upgrade=False)
    try:
        svc = ApiServices.over(settings, sessions)
        rendered = 0
        for study in run.studies:
            for result in svc.results.for_study(study["id"]):
                if result.status != "done":
                    continue
                planes = render_result(svc, result)
                assert set(planes) == {"axial", "coronal", "sagittal"}
                assert all(png.startswith(b"\x89PNG") for png in planes.values())
                rendered += 1
        keys = [k for r in run.results if r[3] == "done" for k in [r[2]]]
        assert rendered == len(keys) >= 11
    finally:
        engine.dispose()


def test_vendored_identifiers_are_nowhere_but_the_vault(vendored: list[BatchRun]) -> None:
    """Issue 16: after the node has stored, de-identified, inferred and encoded the real
    files, no input file's name, Patient ID, birth date or instance UID is in any file
    under its data directory (archive, quarantine, results, audit trail), its log, or a
    dump of its database; the vault holds them encrypted only."""
    import re
    import sqlite3

    from test_realworld_deid_cli import _identifiers, _technical_values

    checked = 0
    for run in vendored:
        assert run.data_dir is not None
        identifiers = set().union(*(_identifiers(f.path) for f in run.files))
        identifiers -= set().union(
            *(_technical_values(dcmread(f.path, stop_before_pixels=True)) for f in run.files))
        # a placeholder name in public test data that the node's own model names contain
        # ("demo-lesion"): not a person
        identifiers -= {v for v in identifiers if v.lower() == "demo"}
        blobs: list[tuple[str, bytes]] = []
        for path in sorted(run.data_dir.rglob("*")):
            if path.is_file() and not path.name.startswith("dicomnode.db"):
                blobs.append((str(path.relative_to(run.data_dir)), path.read_bytes()))
        log = run.data_dir.parent / "node.log"
        blobs.append(("node.log", log.read_bytes()))
        con = sqlite3.connect(run.data_dir / "dicomnode.db")
        try:
            blobs.append(("database dump", "\n".join(con.iterdump()).encode()))
        finally:
            con.close()
        # whole values only: a short numeric Patient ID ("99000") occurs by chance inside
        # the digits of a random pseudonymous UID, which is no leak
        patterns = {v: re.compile(rb"(?<![0-9A-Za-z.])" + re.escape(v.encode())
                                  + rb"(?![0-9A-Za-z])") for v in identifiers}
        for where, data in blobs:
            leaked = [v for v, pat in patterns.items() if pat.search(data)]
            assert not leaked, f"batch {run.batch}: {where} holds {sorted(leaked)[:5]}"
        checked += len(identifiers)
    assert checked > 50  # UIDs at least: the scan had something to find
