"""Real-world DICOM through a running node: the driver shared by the tests and bench/corpus.py.

A corpus is a folder of files plus ``MANIFEST.tsv`` (one row per path: its input class,
whether it is a valid storage object, whether its series makes a volume and why, its
send group, its series). Two corpora use it: the public collection in
``../shared/realworld`` (when present) and the small subset vendored in
``tests/data/realworld`` (always).

Each send group goes to its own node (several groups hold the same series in other
encodings, with the same UIDs). Every file is sent exactly as it is: pynetdicom
proposes the file's own SOP class and transfer syntax and streams the file's bytes.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import shutil
import sqlite3
import tarfile
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodeutil import NodeProcess, dataset_bytes, wait_for
from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info

from dicomnode.inference.package import demo_model_path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "realworld"
VENDORED = REPO / "tests" / "data" / "realworld"

TERMINAL = {"results_sent", "results_held", "not_applicable", "refused", "failed"}
LCE_CT = "1.2.840.10008.5.1.4.1.1.2.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"

# Series whose refusal is the right answer, with the reason the node must give
# (orig_path fragment -> reason fragment). Everything else that is a CT/MR series the
# manifest calls a volume, or a 4D series, must produce a SEG and an SR.
EXPECTED_REFUSALS = {
    "siemens/dti/001": "MOSAIC",
    "siemens/fmri/001": "MOSAIC",
    "dupe-positions.zip": "too scattered",
}


@dataclass(frozen=True)
class CorpusFile:
    """One row of MANIFEST.tsv, with the file's place on disk."""

    id: str
    path: Path
    cls: str
    valid: bool
    volume: str
    batch: str
    series: str
    sop_class: str
    transfer_syntax: str
    orig_path: str

    @property
    def expects_results(self) -> bool:
        """A CT/MR image series the node must run a model on."""
        image_series = self.series not in ("", "-") and (
            "CT/MR" in self.cls or "multi-frame" in self.cls or "regular" in self.cls
            or "Enhanced" in self.cls
        )
        return image_series and self.expected_refusal is None

    @property
    def expected_refusal(self) -> str | None:
        for fragment, reason in EXPECTED_REFUSALS.items():
            if fragment in self.orig_path:
                return reason
        return None


def extract_shared(dest: Path) -> Path | None:
    """Unpack ``../shared/realworld`` into ``dest``; None when it is not there."""
    tarball = SHARED / "realworld.tar.xz"
    if not tarball.exists() or not (SHARED / "MANIFEST.tsv").exists():
        return None
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball) as tar:
        tar.extractall(dest, filter="data")
    shutil.copy(SHARED / "MANIFEST.tsv", dest / "MANIFEST.tsv")
    return dest


def load_manifest(root: Path) -> list[CorpusFile]:
    """The manifest's rows with their files under ``root`` (copies resolved)."""
    with open(root / "MANIFEST.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    by_id = {r["id"]: r for r in rows}
    out = []
    for r in rows:
        location = r["location"]
        while location.startswith("dup:"):
            location = by_id[location[4:]]["location"]
        member = location.split(":", 2)[2] if location.startswith("archive:") else location
        out.append(CorpusFile(
            id=r["id"], path=root / member, cls=r["class"], valid=r["valid"] == "yes",
            volume=r["volume"], batch=r["batch"], series=r["series"],
            sop_class=r["sop_class"], transfer_syntax=r["transfer_syntax"],
            orig_path=r["orig_path"],
        ))
    return out


def send_exact(port: int, files: Iterable[CorpusFile], *, aet: str = "REALWORLD",
               aec: str = "DICOMNODE") -> dict[str, int]:
    """C-STORE every file as it is (its own SOP class and transfer syntax, its bytes).

    Returns the C-STORE status per manifest id (-1: no association / no response).
    """
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True  # stream the file's bytes, no re-encoding
    files = list(files)
    scratch = Path(tempfile.mkdtemp(prefix="corpus-send-"))
    pairs = sorted({(f.sop_class, f.transfer_syntax) for f in files})
    statuses: dict[str, int] = {}
    # at most 127 presentation contexts per association (PS3.8 9.3.2.2)
    for start in range(0, len(pairs), 100):
        chunk = set(pairs[start:start + 100])
        ae = AE(ae_title=aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        for sop_class, ts in sorted(chunk):
            ae.add_requested_context(sop_class, [ts])
        assoc = ae.associate("127.0.0.1", port, ae_title=aec)
        todo = [f for f in files if (f.sop_class, f.transfer_syntax) in chunk]
        if not assoc.is_established:
            statuses.update({f.id: -1 for f in todo})
            continue
        try:
            for f in todo:
                status = assoc.send_c_store(_consistent_meta(f.path, scratch))
                statuses[f.id] = int(status.Status) if "Status" in status else -1
        finally:
            assoc.release()
            ae.shutdown()
    return statuses


def _consistent_meta(path: Path, scratch: Path) -> Path:
    """The file, or a copy whose file meta names the dataset's own SOP class and instance.

    pynetdicom takes the request's Affected SOP Class/Instance UID from the file meta;
    dcmtk's storescu, like an archive, from the dataset. Files anonymised by tools that
    left the meta alone disagree, and a request whose Affected SOP Instance UID differs
    from the dataset's is rightly refused (0xC220). The dataset's bytes stay as they are.
    """
    meta = read_file_meta_info(path)
    ds = dcmread(path, stop_before_pixels=True)
    sop_class, sop_instance = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
    if (str(meta.get("MediaStorageSOPClassUID", "")), str(
            meta.get("MediaStorageSOPInstanceUID", ""))) == (sop_class, sop_instance):
        return path
    body = dataset_bytes(path)
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    buf = io.BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    out = scratch / f"{sop_instance}.dcm"
    out.write_bytes(buf.getvalue() + body)
    return out


def model_package(dest: Path, name: str, modality: str) -> Path:
    """A copy of the bundled demo package under another name and input modality.

    The demo network was trained on CT phantoms; run on MR it finds nothing useful,
    which is all these tests need: a non-CT model whose results must still encode.
    """
    shutil.copytree(demo_model_path(), dest)
    toml = (dest / "model.toml").read_text()
    toml = toml.replace('name = "demo-lesion"', f'name = "{name}"', 1)
    toml = toml.replace('modality = "CT"', f'modality = "{modality}"', 1)
    (dest / "model.toml").write_text(toml)
    return dest


NODE_CONFIG: dict[str, Any] = {
    "completion": {"quiet_period_s": 3.0, "check_interval_s": 0.2},
    "results": {"destinations": []},
    "routing": {"rules": [
        {"name": "ct-multi-frame", "models": ["demo-lesion-mf"], "modality": "CT", "plane": "*",
         "min_slices": 1, "sop_class_uid": LCE_CT},
        {"name": "ct-enhanced", "models": ["demo-lesion-mf"], "modality": "CT", "plane": "*",
         "min_slices": 1, "sop_class_uid": ENHANCED_CT},
        {"name": "ct", "models": ["demo-lesion"], "modality": "CT", "plane": "*",
         "min_slices": 1, "sop_class_uid": CT_IMAGE},
        {"name": "mr", "models": ["demo-lesion-mr"], "modality": "MR", "plane": "*",
         "min_slices": 1},
    ]},
}


@dataclass
class BatchRun:
    """What one send group did on its node."""

    batch: str
    files: list[CorpusFile]
    statuses: dict[str, int]
    seconds: float
    studies: list[dict[str, Any]] = field(default_factory=list)
    instances: list[tuple[Any, ...]] = field(default_factory=list)
    results: list[tuple[Any, ...]] = field(default_factory=list)
    failed_jobs: list[tuple[Any, ...]] = field(default_factory=list)
    spool_files: list[str] = field(default_factory=list)
    series_keys: dict[str, str] = field(default_factory=dict)
    """manifest series -> pseudonymous series key."""
    sop_keys: dict[str, str] = field(default_factory=dict)
    """manifest id -> pseudonymous SOP Instance UID (the index's key)."""
    routed_series: set[str] = field(default_factory=set)
    """Series keys a routing rule chose."""
    data_dir: Path | None = None


def _rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def run_batch(workdir: Path, batch: str, files: list[CorpusFile], *,
              timeout_s: float = 900.0) -> BatchRun:
    """Send one group to a fresh node and wait until every study is final."""
    from dicomnode.dicom.pseudonym import Pseudonymizer

    node = NodeProcess(workdir / f"node-{batch}", NODE_CONFIG)
    packages = workdir / f"packages-{batch}"
    node.cli("db", "upgrade")
    # the node registers the bundled demo only into an empty registry: add all three
    node.cli("models", "add", str(demo_model_path()), "--activate")
    for name, modality in (("demo-lesion-mr", "MR"), ("demo-lesion-mf", "CT")):
        pkg = model_package(packages / name, name, modality)
        node.cli("models", "add", str(pkg), "--activate")
    node.start()
    try:
        t0 = time.monotonic()
        statuses = send_exact(node.port, files)

        def settled() -> bool:
            # read-only SQLite, not the CLI: a Python start per poll would compete with
            # the node for the CPU being measured
            outcomes = [r[0] for r in _rows(node.data_dir / "dicomnode.db",
                                            "select outcome from study")]
            return bool(outcomes) and all(o in TERMINAL for o in outcomes)

        wait_for(settled, timeout_s, 0.25)
        seconds = time.monotonic() - t0
        studies = node.studies()
    finally:
        node.stop()
    db = node.data_dir / "dicomnode.db"
    p = Pseudonymizer((node.data_dir / "keys" / "node.key").read_bytes().strip())
    run = BatchRun(batch=batch, files=files, statuses=statuses, seconds=seconds,
                   studies=studies, data_dir=node.data_dir)
    run.instances = _rows(db, "select i.sop_key, i.state, i.error, s.series_key, i.study_id "
                              "from instance i join series s on s.id = i.series_id")
    run.results = _rows(db, "select study_id, model_name, series_key, status, error "
                            "from inference_result")
    run.failed_jobs = _rows(db, "select task, last_error from job where status = 'failed'")
    run.spool_files = [str(f) for f in (node.data_dir / "spool").rglob("*") if f.is_file()]
    for f in files:
        ds = dcmread(f.path, stop_before_pixels=True)
        run.sop_keys[f.id] = p.uid(str(ds.SOPInstanceUID))
        if f.series not in ("", "-"):
            run.series_keys[f.series] = p.uid(str(ds.SeriesInstanceUID))
    for s in studies:
        for route in (s["info"].get("routing") or {}).get("routes", []):
            run.routed_series.add(route["series_key"])
    return run


COLUMNS = ("files", "stored", "de-identified", "quarantined", "routable", "results encoded",
           "refused with reason")


def by_class(runs: Iterable[BatchRun]) -> dict[str, dict[str, int]]:
    """The figures table: per input class, files and what became of them.

    A file counts as routable when a rule chose its series, results encoded when a SEG
    and SR were made for its series, refused with reason when the model refused it or
    no rule could use it and the study says why.
    """
    table: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for run in runs:
        states = {r[0]: r[1] for r in run.instances}
        study_of = {r[0]: r[4] for r in run.instances}
        outcome = {s["id"]: s for s in run.studies}
        encoded = {r[2] for r in run.results if r[3] == "done"}
        for f in run.files:
            row = table[f.cls]
            row["files"] += 1
            row["stored"] += run.statuses.get(f.id, -1) == 0
            key = run.sop_keys.get(f.id)
            state = states.get(key)
            row["de-identified"] += state == "deidentified"
            row["quarantined"] += state == "quarantined"
            series = run.series_keys.get(f.series)
            row["routable"] += series in run.routed_series
            if series in encoded:
                row["results encoded"] += 1
            else:
                study = outcome.get(study_of.get(key))
                if study and study["outcome"] in ("refused", "not_applicable") and (
                        study["outcome_reason"]):
                    row["refused with reason"] += 1
    return {k: {c: int(v.get(c, 0)) for c in COLUMNS} for k, v in sorted(table.items())}


def markdown(table: Mapping[str, Mapping[str, int]]) -> str:
    """The table as Markdown (docs/benchmarks.md)."""
    lines = ["| input class | " + " | ".join(COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    totals: collections.Counter[str] = collections.Counter()
    for cls, row in table.items():
        lines.append(f"| {cls} | " + " | ".join(str(row[c]) for c in COLUMNS) + " |")
        totals.update(row)
    lines.append("| **all** | " + " | ".join(f"**{totals[c]}**" for c in COLUMNS) + " |")
    return "\n".join(lines)


def dump(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, default=str))
