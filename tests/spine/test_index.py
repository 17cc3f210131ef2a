"""StudyIndex and study completion on real SQLite and PostgreSQL."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, select

from dicomnode.config import CompletionRule, SeriesRequirement
from dicomnode.jobs.base import TaskRegistry
from dicomnode.jobs.local import LocalQueue
from dicomnode.storage.db import create_db_engine, migrate, schema_state, session_factory
from dicomnode.storage.index import ReceivedInstance, StudyIndex
from dicomnode.storage.models import Instance, Job, Study


@pytest.fixture
def index(db_url: str):
    engine = create_db_engine(db_url)
    migrate(engine)
    yield StudyIndex(session_factory(engine))
    engine.dispose()


def rec(study="s1", series="se1", sop="i1", token="a", modality="CT", number=1, ae="MOD"):
    return ReceivedInstance(
        study_key=study, series_key=series, sop_key=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1", modality=modality, series_number=number,
        path=f"spool/{study}/{sop}.{token}.dcm", size=10, dataset_offset=4, calling_ae=ae,
    )


def test_migration_reaches_head(db_url: str) -> None:
    engine = create_db_engine(db_url)
    assert schema_state(engine)[0] is None
    migrate(engine)
    current, head = schema_state(engine)
    assert current == head
    engine.dispose()


def test_recording_an_instance_again_keeps_one_row(index: StudyIndex) -> None:
    a = index.record_instance(rec(), quiet_period_s=30, max_wait_s=3600, now=100)
    b = index.record_instance(rec(), quiet_period_s=30, max_wait_s=3600, now=101)
    assert a.study_id == b.study_id and b.replaced_paths == ()
    [s] = index.studies()
    assert (s.series, s.instances) == (1, 1)
    assert index.stored_instance("i1") is not None and index.stored_instance("nope") is None


def test_other_bytes_under_same_uid_replace_and_reopen(index: StudyIndex) -> None:
    index.record_instance(rec(token="a"), quiet_period_s=1, max_wait_s=3600, now=100)
    index.complete_due([], lambda s, i, v: None, now=200)
    out = index.record_instance(rec(token="b"), quiet_period_s=1, max_wait_s=3600, now=300)
    assert out.replaced_paths == ("spool/s1/i1.a.dcm",)
    assert index.stored_instance("i1").path == "spool/s1/i1.b.dcm"
    assert out.reopened and out.study_version == 2
    [s] = index.studies()
    assert (s.state, s.version, s.instances) == ("receiving", 2, 1)


def test_quiet_period_completes_once(index: StudyIndex) -> None:
    fired: list[tuple[int, int]] = []
    for i in range(3):
        index.record_instance(rec(sop=f"i{i}"), quiet_period_s=30, max_wait_s=3600, now=100 + i)
    assert index.complete_due([], lambda s, i, v: fired.append((i, v)), now=131) == []
    done = index.complete_due([], lambda s, i, v: fired.append((i, v)), now=132)
    assert [(v, r) for _, v, r in done] == [(1, "quiet-period")]
    assert index.complete_due([], lambda s, i, v: fired.append((i, v)), now=500) == []
    assert len(fired) == 1


def test_late_instance_reopens_and_completes_again(index: StudyIndex) -> None:
    index.record_instance(rec(sop="i0"), quiet_period_s=10, max_wait_s=3600, now=0)
    index.complete_due([], lambda s, i, v: None, now=10)
    index.record_instance(rec(sop="i1", series="se2"), quiet_period_s=10, max_wait_s=3600, now=20)
    [s] = index.studies()
    assert (s.state, s.version, s.completed_version, s.series) == ("receiving", 2, 1, 2)
    done = index.complete_due([], lambda s, i, v: None, now=30)
    assert [d[1] for d in done] == [2]


def test_force_deadline_completes_a_busy_study(index: StudyIndex) -> None:
    for t in range(0, 100, 5):  # an instance every 5 s, quiet period never reached
        index.record_instance(rec(sop=f"i{t}"), quiet_period_s=10, max_wait_s=60, now=t)
        done = index.complete_due([], lambda s, i, v: None, now=t + 1)
        if done:
            assert done[0][2] == "deadline" and t >= 60
            break
    else:
        pytest.fail("deadline never fired")


def test_required_series_rule_completes_early(index: StudyIndex) -> None:
    rule = CompletionRule(
        name="ct+sr", series=[SeriesRequirement(modality="CT", min_instances=3),
                              SeriesRequirement(modality="SR")], settle_s=1,
    )
    for i in range(3):
        index.record_instance(rec(sop=f"c{i}"), quiet_period_s=300, max_wait_s=3600, now=10 + i)
    assert index.complete_due([rule], lambda s, i, v: None, now=20) == []  # SR missing
    index.record_instance(rec(sop="sr", series="se-sr", modality="SR"), quiet_period_s=300,
                          max_wait_s=3600, now=21)
    assert index.complete_due([rule], lambda s, i, v: None, now=21.5) == []  # settling
    done = index.complete_due([rule], lambda s, i, v: None, now=22.5)
    assert [d[2] for d in done] == ["rule:ct+sr"]


def test_rule_for_other_calling_ae_does_not_apply(index: StudyIndex) -> None:
    rule = CompletionRule(name="r", calling_ae="OTHER", series=[SeriesRequirement(modality="CT")],
                          settle_s=0)
    index.record_instance(rec(), quiet_period_s=300, max_wait_s=3600, now=0)
    assert index.complete_due([rule], lambda s, i, v: None, now=5) == []


def test_completion_and_job_are_one_transaction(index: StudyIndex) -> None:
    """The hook job is enqueued in the transaction that completes the study: exactly once."""
    reg = TaskRegistry()
    reg.register("study_complete", lambda ctx, **kw: None)
    queue = LocalQueue(index.sessions, reg, workers={})

    def on_complete(session, study_id, version):
        queue.enqueue("study_complete", {"study_id": study_id, "version": version},
                      dedup_key=f"c:{study_id}:{version}", session=session)

    index.record_instance(rec(), quiet_period_s=1, max_wait_s=3600, now=0)
    # Two completion loops racing (two threads, as two processes would)
    results: list[list[tuple[int, int, str]]] = []

    def race() -> None:
        results.append(index.complete_due([], on_complete, now=5))

    threads = [threading.Thread(target=race) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(len(r) for r in results) == 1
    with index.sessions() as s:
        assert s.execute(select(func.count()).select_from(Job)).scalar() == 1
        assert s.execute(select(Study.state)).scalar() == "complete"


def test_concurrent_senders_of_one_study_make_one_study(index: StudyIndex) -> None:
    errors: list[BaseException] = []

    def send(worker: int) -> None:
        try:
            for i in range(20):
                index.record_instance(rec(sop=f"w{worker}-{i}", series=f"se{worker % 2}"),
                                      quiet_period_s=30, max_wait_s=3600)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    [s] = index.studies()
    assert (s.series, s.instances) == (2, 80)
    with index.sessions() as sess:
        assert sess.execute(select(func.count()).select_from(Instance)).scalar() == 80
