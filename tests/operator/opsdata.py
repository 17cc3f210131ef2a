"""Operator-surface test data: a node's database and files with one real phantom study.

:func:`build_node_data` runs the pipeline's own task functions in this process,
one after the other (no queue workers, no sockets): ingest as the C-STORE handler
does, de-identify, route, infer with the bundled demo model, encode SEG/SR into
the outbox. Then it adds the states an operator must see: a dead-lettered and a
pending outbox item, a failed job, a quarantined instance, a second model
version, drift records and a training run with its dataset card.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodeutil import dataset_bytes, write_study
from pydicom import dcmread
from sqlalchemy import update

from dicomnode.api import ApiServer, ApiServices, ApiSettings, create_api
from dicomnode.app import Node, create_node, ensure_demo_model
from dicomnode.config import NodeSettings, load_settings
from dicomnode.dicom.phantom import make_ct_study
from dicomnode.inference import demo_model_path
from dicomnode.pipeline.deid import deidentify_pending
from dicomnode.pipeline.infer import infer, route_study
from dicomnode.pipeline.results import encode_results
from dicomnode.storage.models import Instance, Job, OutboxItem

MARKERS = {
    "patient_name": "Phimarkfamily^Phimarkgiven",
    "patient_id": "PHIMARK-ID-7741",
    "accession_number": "PHIMARK-ACC-99",
    "institution_name": "Phimark Memorial Hospital",
    "referring_physician": "Phimarkdoctor^Referring",
    "patient_birth_date": "19570214",
}
TOKEN = "test-token-0123456789abcdef"
USER, PASSWORD = "alice", "correct horse battery"


def phi_study(seed: int = 4242, n_slices: int = 16, **extra: Any) -> Any:
    """A phantom CT study carrying the PHI markers."""
    return make_ct_study(
        seed=seed, n_slices=n_slices, rows=64, columns=64,
        patient_name=MARKERS["patient_name"], patient_id=MARKERS["patient_id"],
        accession_number=MARKERS["accession_number"],
        institution_name=MARKERS["institution_name"],
        referring_physician=MARKERS["referring_physician"],
        patient_birth_date=MARKERS["patient_birth_date"], **extra,
    )


def phi_strings(files: Iterable[Path]) -> list[str]:
    """Every marker, its name parts and the original UIDs of the files."""
    out = set(MARKERS.values())
    out |= {part for v in (MARKERS["patient_name"], MARKERS["referring_physician"])
            for part in v.split("^")}
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        out |= {str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                str(ds.FrameOfReferenceUID)}
    return sorted(out)


def assert_no_phi(text: str | bytes, markers: Iterable[str], where: str) -> None:
    blob = text if isinstance(text, str) else text.decode("utf-8", "replace")
    for m in markers:
        assert m not in blob, f"PHI marker {m!r} in {where}"


def api_settings(**extra: Any) -> ApiSettings:
    return ApiSettings(token=TOKEN, users={USER: PASSWORD}, **extra)


@dataclass
class NodeData:
    settings: NodeSettings
    node: Node
    services: ApiServices
    files: list[Path]
    study_id: int
    result_id: int
    dead_item: int
    pending_item: int
    markers: list[str]


def _candidate(tmp: Path, version: str) -> Path:
    """The demo package under another version (same graph, so the same checksum)."""
    pkg = tmp / f"demo-{version}"
    shutil.copytree(demo_model_path(), pkg)
    toml = pkg / "model.toml"
    toml.write_text(toml.read_text().replace('version = "1.0.0"', f'version = "{version}"', 1))
    return pkg


def build_node_data(tmp: Path) -> NodeData:
    """See the module docstring. The caller disposes ``node.engine``."""
    settings = load_settings(None, {
        "data_dir": tmp / "data", "storage": {"fsync": False},
        "peers": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 9}},
        "results": {"destinations": ["pacs"]},
    })
    node = create_node(settings)
    ctx = node.ctx
    assert ctx.registry is not None and ctx.labels is not None and node.ingestor is not None
    ensure_demo_model(ctx.registry)
    study = phi_study()
    files = write_study(study, tmp / "src")
    # a second study that is still arriving: one object, kept apart as if at risk
    other = write_study(phi_study(seed=77, n_slices=1), tmp / "src2")
    for f in files + other:
        ds = dcmread(f, stop_before_pixels=True)
        node.ingestor.ingest(dataset_bytes(f), str(ds.file_meta.TransferSyntaxUID),
                             calling_ae="MODALITY", affected_sop_class_uid=str(ds.SOPClassUID),
                             affected_sop_instance_uid=str(ds.SOPInstanceUID))
    study_id = next(s.id for s in node.index.studies() if s.instances == len(files))
    node.index.complete_due([], lambda s, i, v: None, now=time.time() + 3600)
    deidentify_pending(ctx, study_id, 1)
    route_study(ctx, study_id, 1)
    [series_key] = node.index.series_files(study_id)
    infer(ctx, study_id, 1, "demo-lesion", series_key)
    node.index.mark_hooked(study_id, 1)
    assert ctx.results is not None and ctx.outbox is not None
    [result] = ctx.results.for_study(study_id)
    encode_results(ctx, result.id)
    seg, sr = ctx.outbox.list(study_id=study_id)
    now = time.time()
    with node.sessions.begin() as s:
        s.execute(update(OutboxItem).where(OutboxItem.id == seg.id).values(
            status="dead", attempts=10, last_error="SendError: PACS answered C-STORE status "
                                                   "0xA700"))
        s.execute(update(OutboxItem).where(OutboxItem.id == sr.id).values(
            attempts=2, next_attempt_at=now + 60, last_error="SendError: association refused"))
        s.execute(update(Job).where(Job.task == "infer").values(
            status="failed", attempts=5, last_error="ModelError: example failure"))
        s.execute(update(Instance).where(Instance.study_id != study_id).values(
            state="quarantined", error="quarantined: burned_in_annotation"))
    cand = ctx.registry.add(_candidate(tmp, "1.0.1"), created_by="dicomnode (retraining)",
                            metrics={"gate": {"candidate_mean": 0.91, "promote": False}},
                            card={"name": "demo-lesion", "studies": {"train": 3, "val": 1,
                                                                     "test": 1}})
    ctx.registry.set_status(cand.name, cand.version, "rejected", "gate: no gain")
    other_id = next(s.id for s in node.index.studies() if s.id != study_id)
    # one record per (study, model version): a later label for it replaces the record
    for sid, version, dice in ((study_id, "1.0.0", 0.93), (other_id, "1.0.0", 0.88),
                               (study_id, "1.0.1", 0.81)):
        ctx.labels.add_drift(model_name="demo-lesion", model_version=version, study_id=sid,
                             dice={"1": dice})
        time.sleep(0.002)
    run = ctx.labels.start_run("demo-lesion")
    ctx.labels.finish_run(run, status="rejected", reason="gate: no gain", version="1.0.1",
                          new_labels=5, metrics={"gate": {"candidate_mean": 0.91}},
                          card=json.loads(json.dumps({
                              "name": "demo-lesion", "seed": 0, "fractions": [0.7, 0.15, 0.15],
                              "studies": {"train": 3, "val": 1, "test": 1},
                              "patients": {"train": 3, "val": 1, "test": 1},
                              "totals": {"modality": {"CT": 5}}, "by_split": {},
                              "excluded": {}, "notes": ["synthetic"]})))
    services = ApiServices.from_context(ctx, node.sessions)
    return NodeData(settings, node, services, files, study_id, result.id, seg.id, sr.id,
                    phi_strings(files + other))


@contextmanager
def serving(data: NodeData, **api: Any) -> Iterator[str]:
    """create_api over ``data`` served by :class:`ApiServer` on a free port; yields its URL."""
    server = ApiServer(create_api(data.services, api_settings(**api)), "127.0.0.1", 0)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()
