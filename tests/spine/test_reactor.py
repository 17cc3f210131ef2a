"""The acceptor loop (scp/reactor.py) against pynetdicom's own, over real sockets.

Both loops must store every object, answer a release, notice an abort and end an idle
association at the network timeout; the event-driven one must be the loop that runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from nodeutil import free_port, wait_for
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import func, select

from dicomnode.app import create_node
from dicomnode.config import load_settings
from dicomnode.dicom.phantom import make_ct_study
from dicomnode.scp import reactor
from dicomnode.storage.models import Instance


def acceptors(node) -> list[Association]:  # noqa: ANN001
    assert node.server is not None
    return [a for a in node.server.ae.active_associations if a.is_acceptor]


@pytest.mark.parametrize("event_reactor", [True, False], ids=["event-driven", "pynetdicom"])
def test_acceptor_loop_stores_releases_aborts_and_times_out(tmp_path: Path,
                                                           event_reactor: bool) -> None:
    port = free_port()
    settings = load_settings(None, {
        "data_dir": tmp_path / "data",
        "scp": {"host": "127.0.0.1", "port": port, "accept_any_ae": True,
                "event_reactor": event_reactor, "network_timeout_s": 1.0,
                "processes": 1},  # in this process: the test looks at its associations
        "inference": {"demo_model": False},
    })
    study = make_ct_study(n_slices=12, rows=64, columns=64, seed=7)
    node = create_node(settings)
    node.start()
    try:
        scu = AE(ae_title="MODALITY")
        scu.add_requested_context(CTImageStorage)

        assoc = scu.associate("127.0.0.1", port)
        assert assoc.is_established
        [acceptor] = wait_for(lambda: acceptors(node), 5)
        loop = acceptor._run_reactor.__func__
        assert loop is (reactor._run_reactor if event_reactor else Association._run_reactor)
        for ds in study.datasets[:10]:
            assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
        assert assoc.is_released
        wait_for(lambda: not acceptors(node), 5)

        # the peer aborts after one object: that object is kept, the loop ends
        assoc = scu.associate("127.0.0.1", port)
        assert assoc.send_c_store(study.datasets[10]).Status == 0x0000
        assoc.abort()
        wait_for(lambda: not acceptors(node), 5)

        # an idle peer is let go at scp.network_timeout_s
        assoc = scu.associate("127.0.0.1", port)
        assert assoc.is_established
        wait_for(lambda: not assoc.is_established, 10)
        wait_for(lambda: not acceptors(node), 5)

        with node.sessions() as s:
            assert s.scalar(select(func.count()).select_from(Instance)) == 11
    finally:
        node.stop()


def test_supported_pynetdicom() -> None:
    # pyproject pins pynetdicom<4; were a 4.x installed, the node would run its own loop
    assert reactor.supported()
