"""No instance stays identified longer than ``deid.max_delay_s`` (plus the sweep interval).

Bursts of C-STOREs that end at 0.02, 0.5 and 0.98 s into a wall-clock second, with a
quiet period of one hour (so study completion never de-identifies anything): every
instance must be de-identified within ``max_delay_s`` + ``sweep_interval_s`` of its
receipt, and nothing identified may be left in the spool. Once with the default settle
time (the study pauses after the burst) and once with a settle time far beyond the
deadline (only the per-instance deadline can act).
"""

from __future__ import annotations

import math
import sqlite3
import time
from pathlib import Path

import pytest
from nodeutil import NodeProcess, wait_for
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dicomnode.dicom.phantom import make_ct_study

MAX_DELAY_S = 2.0
SWEEP_S = 1.0


def rows(node: NodeProcess, sql: str) -> list[tuple]:
    con = sqlite3.connect(f"file:{node.data_dir / 'dicomnode.db'}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def burst_ending_at(port: int, fraction: float, seed: int, n: int = 12,
                    length_s: float = 1.2) -> None:
    """One association sending ``n`` instances evenly over ``length_s``, the last one
    ``fraction`` s into a wall-clock second."""
    study = make_ct_study(n_slices=n, rows=64, columns=64, seed=seed, patient_id=f"PAT-{seed}")
    end = math.ceil(time.time()) + 1 + fraction
    start = end - length_s
    ae = AE(ae_title="BURSTY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        for i, ds in enumerate(study.datasets):
            time.sleep(max(0.0, start + i * length_s / (n - 1) - time.time()))
            assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()


@pytest.mark.parametrize("settle_s", [0.5, 600.0], ids=["settle-default", "deadline-only"])
def test_every_instance_is_deidentified_by_its_deadline(tmp_path: Path, settle_s: float) -> None:
    config = {
        "completion": {"quiet_period_s": 3600.0},
        "deid": {"max_delay_s": MAX_DELAY_S, "settle_s": settle_s, "sweep_interval_s": SWEEP_S},
    }
    with NodeProcess(tmp_path / "node", config) as node:
        for i, fraction in enumerate((0.02, 0.5, 0.98)):
            burst_ending_at(node.port, fraction, seed=300 + i)
        wait_for(lambda: rows(node, "select count(*) from instance")[0][0] == 36
                 and not rows(node, "select id from instance where state = 'received'"),
                 MAX_DELAY_S + SWEEP_S + 15)
        waited = rows(node, "select deidentified_at - received_at, state from instance")
        assert len(waited) == 36
        assert {state for _, state in waited} <= {"deidentified", "quarantined"}
        worst = max(w for w, _ in waited)
        assert worst <= MAX_DELAY_S + SWEEP_S, f"an instance waited {worst:.2f} s"
        # nothing identified left in the spool, and no study was completed meanwhile
        assert not [f for f in (node.data_dir / "spool").rglob("*") if f.is_file()]
        assert {s["state"] for s in node.studies()} == {"receiving"}
