"""The JSON API, /metrics and the dashboard pages over a node's real data (opsdata.py)."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import httpx
import pytest
from opsdata import PASSWORD, TOKEN, USER, NodeData, assert_no_phi, serving
from sqlalchemy import select

from dicomnode.api import ApiServices
from dicomnode.config import RoutingRule, RoutingSettings
from dicomnode.inference.package import demo_model_paths
from dicomnode.storage.models import Job

GETS = ["/health/ready", "/api/studies", "/api/studies/{study}", "/api/outbox",
        "/api/models", "/api/models/demo-lesion", "/api/training-runs", "/api/jobs",
        "/api/queues", "/api/quarantine", "/metrics", "/api/openapi.json"]
PAGES = ["/ui/studies", "/ui/studies/{study}", "/ui/outbox", "/ui/models", "/ui/training",
         "/ui/jobs", "/ui/quarantine", "/ui/studies/{study}/results/{result}/axial.png"]
POSTS = ["/api/outbox/{dead}/retry", "/api/outbox/{dead}/drop",
         "/api/models/demo-lesion/versions/1.0.1/promote", "/api/models/demo-lesion/rollback",
         "/ui/outbox/{dead}/retry", "/ui/outbox/{dead}/drop",
         "/ui/models/demo-lesion/versions/1.0.1/promote", "/ui/models/demo-lesion/rollback"]


def _fill(path: str, data: NodeData) -> str:
    return path.format(study=data.study_id, result=data.result_id, dead=data.dead_item)


def _audit(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "dicomnode.audit"]


# -- authentication ---------------------------------------------------------------------


def test_every_route_refuses_without_credentials(node_data: NodeData, api_url: str) -> None:
    with httpx.Client(base_url=api_url) as anon:
        assert anon.get("/health/live").json() == {"status": "ok"}
        for path in GETS + PAGES:
            r = anon.get(_fill(path, node_data))
            assert r.status_code == 401, path
            assert "Basic" in r.headers["www-authenticate"], path
        for path in POSTS:
            assert anon.post(_fill(path, node_data)).status_code == 401, path
    # nothing changed
    assert node_data.services.outbox.get(node_data.dead_item).status == "dead"


def test_wrong_credentials_are_refused_and_audited(
        node_data: NodeData, api_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicomnode.audit")
    r = httpx.get(f"{api_url}/api/studies", headers={"Authorization": "Bearer not-the-token"})
    assert r.status_code == 401
    r = httpx.get(f"{api_url}/api/studies", auth=(USER, "wrong password"))
    assert r.status_code == 401
    r = httpx.get(f"{api_url}/api/studies", auth=("mallory", PASSWORD))
    assert r.status_code == 401
    failed = [a for a in _audit(caplog) if a["event"] == "api_authentication_failed"]
    assert len(failed) == 3
    for a in failed:
        assert a["EventID"]["csd-code"] == "110114" and a["EventOutcomeIndicator"] == 4
        assert a["ActiveParticipant"][0]["NetworkAccessPointID"] == "127.0.0.1"
    assert {a["ActiveParticipant"][0]["UserID"] for a in failed} == {"unknown", USER, "mallory"}
    assert all(TOKEN not in json.dumps(a) and PASSWORD not in json.dumps(a) for a in failed)


def test_token_and_basic_auth_are_accepted(api_url: str) -> None:
    assert httpx.get(f"{api_url}/api/queues",
                     headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert httpx.get(f"{api_url}/api/queues", auth=(USER, PASSWORD)).status_code == 200
    assert httpx.get(f"{api_url}/ui/studies", auth=(USER, PASSWORD)).status_code == 200


def test_metrics_can_be_public(node_data: NodeData) -> None:
    with serving(node_data, metrics_public=True) as url:
        assert httpx.get(f"{url}/metrics").status_code == 200
        assert httpx.get(f"{url}/api/studies").status_code == 401


def test_token_file_and_generated_token(node_data: NodeData, tmp_path: Any) -> None:
    from dicomnode.api.auth import resolve_token
    from dicomnode.errors import ConfigError

    generated = resolve_token(None, None, tmp_path)
    assert len(generated) >= 32
    assert (tmp_path / "keys" / "api.token").stat().st_mode & 0o777 == 0o600
    assert resolve_token(None, None, tmp_path) == generated  # kept
    f = tmp_path / "t"
    f.write_text("short\n")
    with pytest.raises(ConfigError, match="api.token_file"):
        resolve_token(None, f, tmp_path)


# -- studies ----------------------------------------------------------------------------


def test_studies_list_shows_each_step(api: httpx.Client, node_data: NodeData) -> None:
    body = api.get("/api/studies").json()
    assert body["total"] == 2
    study = next(s for s in body["items"] if s["id"] == node_data.study_id)
    assert study["instances"] == 16 and study["modalities"] == ["CT"]
    assert study["study_key"].startswith("2.25.") and study["patient_key"].startswith("P")
    steps = {s["name"]: s for s in study["steps"]}
    assert list(steps) == ["receive", "complete", "deidentify", "route", "infer", "encode",
                           "send"]
    assert [steps[n]["state"] for n in list(steps)[:-1]] == ["done"] * 6
    assert steps["send"]["state"] == "failed"  # one object dead-lettered
    assert steps["infer"]["seconds"] > 0 and "demo-lesion" in steps["route"]["detail"]
    assert api.get("/api/studies", params={"state": "receiving"}).json()["total"] == 0
    assert len(api.get("/api/studies", params={"limit": 1}).json()["items"]) == 1
    assert api.get("/api/studies", params={"limit": 0}).status_code == 422


def test_study_detail(api: httpx.Client, node_data: NodeData) -> None:
    d = api.get(f"/api/studies/{node_data.study_id}").json()
    assert d["routing"]["applicable"] is True
    [result] = d["results"]
    assert result["status"] == "done" and result["model_name"] == "demo-lesion"
    assert result["findings"] and result["findings"][0]["volume_mm3"] > 0
    assert "run_s" in result["timings"] or len(result["timings"]) >= 2
    assert {i["status"] for i in d["outbox"]} == {"dead", "pending"}
    assert d["instance_states"] == {"deidentified": 16}
    sources = {e["source"] for e in d["errors"]}
    assert {"outbox", "job"} <= sources  # the dead letter's error and the failed infer job
    # result objects' own UIDs (theirs on the PACS) are not shown
    for item in node_data.services.outbox.list():
        assert item.sop_instance_uid not in json.dumps(d)
    assert api.get("/api/studies/999999").status_code == 404


# -- outbox -----------------------------------------------------------------------------


def test_outbox_listing(api: httpx.Client, node_data: NodeData) -> None:
    body = api.get("/api/outbox").json()
    assert body["counts"] == {"dead": 1, "pending": 1}
    [dead] = api.get("/api/outbox", params={"status": "dead"}).json()["items"]
    assert dead["id"] == node_data.dead_item and dead["attempts"] == 10
    assert "0xA700" in dead["last_error"]
    assert api.get("/api/outbox", params={"status": "nonsense"}).status_code == 422


def _send_jobs(data: NodeData, item_id: int) -> list[Job]:
    with data.node.sessions() as s:
        return [j for j in s.execute(select(Job).where(Job.task == "send_result")).scalars()
                if j.args.get("outbox_id") == item_id]


def test_outbox_retry_and_drop_do_what_the_cli_does(
        fresh_data: NodeData, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicomnode.audit")
    data = fresh_data
    before = len(_send_jobs(data, data.dead_item))
    with serving(data) as url, httpx.Client(base_url=url, auth=(USER, PASSWORD)) as api:
        r = api.post(f"/api/outbox/{data.dead_item}/retry")
        assert r.status_code == 200, r.text
        assert (r.json()["status"], r.json()["attempts"], r.json()["next_attempt_at"]) == (
            "pending", 0, None)
        jobs = _send_jobs(data, data.dead_item)
        assert len(jobs) == before + 1 and jobs[-1].status == "todo"
        assert jobs[-1].queue == "send" and jobs[-1].dedup_key is None
        r = api.post(f"/api/outbox/{data.pending_item}/drop")
        assert r.json()["status"] == "dropped"
        assert data.services.outbox.get(data.pending_item).status == "dropped"
        assert api.post("/api/outbox/424242/retry").status_code == 404
        assert api.post("/api/outbox/424242/drop").status_code == 404
        data.services.outbox.update(data.dead_item, status="sent")
        r = api.post(f"/api/outbox/{data.dead_item}/retry")
        assert r.status_code == 409 and "sent" in r.json()["detail"]
    actions = [a for a in _audit(caplog) if a["event"] == "operator_action"]
    assert [(a["Detail"]["action"], a["Detail"]["outbox_id"]) for a in actions] == [
        ("outbox_retry", data.dead_item), ("outbox_drop", data.pending_item)]
    assert actions[0]["ActiveParticipant"][0]["UserID"] == f"api:{USER}"


def test_study_retry_only_from_a_final_outcome_and_audited(
        fresh_data: NodeData, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicomnode.audit")
    data = fresh_data
    index = data.services.index
    study = index.study(data.study_id)
    assert study is not None and study.state == "complete"
    with serving(data) as url, httpx.Client(base_url=url, auth=(USER, PASSWORD)) as api:
        assert api.post("/api/studies/424242/retry").status_code == 404
        index.set_outcome(data.study_id, study.version, "processing")
        r = api.post(f"/api/studies/{data.study_id}/retry")
        assert r.status_code == 409 and "processing" in r.json()["detail"]
        assert index.set_outcome(data.study_id, study.version, "failed", "infer failed: X")
        listed = api.get("/api/studies").json()["items"]
        assert [(s["outcome"], s["outcome_reason"]) for s in listed
                if s["id"] == data.study_id] == [("failed", "infer failed: X")]
        r = api.post(f"/api/studies/{data.study_id}/retry")
        assert r.status_code == 200, r.text
        assert (r.json()["outcome"], r.json()["run"]) == ("processing", 2)
    # the dead delivery is pending again, and one completion job runs the study again
    assert data.services.outbox.get(data.dead_item).status == "pending"
    with data.node.sessions() as s:
        jobs = [j for j in s.execute(select(Job).where(Job.task == "study_complete")).scalars()
                if j.dedup_key == f"study_complete:{data.study_id}:{study.version}:r2"]
    assert len(jobs) == 1 and jobs[0].args == {"study_id": data.study_id,
                                               "version": study.version}
    actions = [a for a in _audit(caplog) if a["event"] == "operator_action"]
    assert [(a["Detail"]["action"], a["Detail"]["previous_outcome"]) for a in actions] == [
        ("study_retry", "failed")]


# -- models -----------------------------------------------------------------------------


def test_models_show_versions_metrics_and_drift(api: httpx.Client) -> None:
    items = api.get("/api/models").json()["items"]
    # both bundled demos are registered on a fresh node
    assert sorted(x["name"] for x in items) == sorted(p.name for p in demo_model_paths())
    [m] = [x for x in items if x["name"] == "demo-lesion"]
    assert m["active_version"] == "1.0.0"
    versions = {v["version"]: v for v in m["versions"]}
    assert versions["1.0.0"]["status"] == "active"
    assert versions["1.0.0"]["heldout_dice"] == pytest.approx(0.9802)
    assert "provenance" in versions["1.0.0"]["heldout_source"]
    assert versions["1.0.0"]["production_n"] == 2
    assert versions["1.0.0"]["production_dice"] == pytest.approx((0.93 + 0.88) / 2, abs=1e-3)
    assert versions["1.0.1"]["production_n"] == 1
    assert versions["1.0.1"]["status"] == "rejected"
    assert versions["1.0.1"]["heldout_dice"] == pytest.approx(0.91)
    assert [round(d["mean_dice"], 2) for d in m["drift"]] == [0.93, 0.88, 0.81]
    assert api.get("/api/models/demo-lesion").json()["name"] == "demo-lesion"
    assert api.get("/api/models/no-such-model").status_code == 404


def test_promote_and_rollback_as_the_cli(fresh_data: NodeData,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicomnode.audit")
    reg = fresh_data.services.registry
    with serving(fresh_data) as url, httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        r = api.post("/api/models/demo-lesion/versions/1.0.1/promote",
                     json={"reason": "reviewed by the ML lead"})
        assert r.status_code == 200 and r.json()["status"] == "active"
        assert reg.active("demo-lesion").version == "1.0.1"
        assert reg.get("demo-lesion", "1.0.0").status == "retired"
        assert reg.active("demo-lesion").reason == "reviewed by the ML lead"
        r = api.post("/api/models/demo-lesion/rollback")
        assert r.status_code == 200 and r.json()["version"] == "1.0.0"
        assert reg.active("demo-lesion").version == "1.0.0"
        assert reg.get("demo-lesion", "1.0.1").status == "retired"
        assert api.post("/api/models/demo-lesion/versions/9.9/promote").status_code == 404
        assert api.post("/api/models/other/rollback").status_code == 404
        assert api.post("/api/models/demo-lesion/versions/1.0.0/promote",
                        json={"reason": "x" * 501}).status_code == 422
    events = [(a["event"], a.get("Detail", {}).get("action")) for a in _audit(caplog)]
    assert ("model_promoted", None) in events and ("operator_action", "model_promote") in events
    assert ("operator_action", "model_rollback") in events
    promoted = next(a for a in _audit(caplog) if a["event"] == "model_promoted")
    assert promoted["EventTypeCode"][0]["csd-code"] == "110131"
    assert promoted["ParticipantObjectIdentification"][0]["ParticipantObjectID"] == \
        "demo-lesion 1.0.1"


def test_rollback_without_an_earlier_version_is_a_conflict(fresh_data: NodeData) -> None:
    with serving(fresh_data) as url:
        r = httpx.post(f"{url}/api/models/demo-lesion/rollback",
                       headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 409 and "no earlier" in r.json()["detail"]


# -- jobs, queues, quarantine, training, health -------------------------------------------


def test_jobs_queues_quarantine_and_training(api: httpx.Client, node_data: NodeData) -> None:
    failed = api.get("/api/jobs", params={"status": "failed"}).json()["items"]
    assert [j["task"] for j in failed] == ["infer"]
    assert failed[0]["last_error"] == "ModelError: example failure"
    assert failed[0]["args"]["study_id"] == node_data.study_id
    queues = {q["queue"]: q for q in api.get("/api/queues").json()["queues"]}
    assert queues["gpu"]["failed"] == 1 and queues["send"]["todo"] >= 2
    assert set(node_data.settings.jobs.workers) <= set(queues)
    [q] = api.get("/api/quarantine").json()["items"]
    assert q["state"] == "quarantined" and "burned_in" in q["reason"]
    [run] = api.get("/api/training-runs").json()["items"]
    assert run["status"] == "rejected" and run["card"]["studies"]["train"] == 3


def test_readiness(api: httpx.Client, node_data: NodeData) -> None:
    body = api.get("/health/ready").json()
    assert body["status"] == "ready" and all(c["ok"] for c in body["checks"].values())
    settings = node_data.settings.model_copy(update={"routing": RoutingSettings(
        rules=[RoutingRule(name="x", models=["absent-model"])])})
    import dataclasses

    services: ApiServices = dataclasses.replace(node_data.services, settings=settings)
    data = dataclasses.replace(node_data, services=services)
    with serving(data) as url:
        r = httpx.get(f"{url}/health/ready", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 503 and "absent-model" in r.json()["checks"]["models"]["detail"]


def test_metrics(api: httpx.Client) -> None:
    text = api.get("/metrics").text
    assert 'dicomnode_queue_depth{queue="send"}' in text
    assert 'dicomnode_outbox_items{status="dead"} 1.0' in text
    assert 'dicomnode_model_active{model="demo-lesion",version="1.0.0"} 1.0' in text
    # the pipeline ran in this process (opsdata): its stage histograms are here
    for stage in ("deidentify", "route", "inference", "encode"):
        assert f'dicomnode_stage_seconds_count{{stage="{stage}"}}' in text, stage
    assert re.search(r'dicomnode_inference_seconds_count\{model="demo-lesion",'
                     r'version="1.0.0"\} [1-9]', text)
    for name in ("dicomnode_instances_received_total", "dicomnode_instances_rejected",
                 "dicomnode_associations", "dicomnode_send_attempts",
                 "dicomnode_send_failures", "dicomnode_vault_reads"):
        assert f"# TYPE {name.removesuffix('_total')}" in text, name


# -- pages ------------------------------------------------------------------------------


def test_pages_render(api: httpx.Client, node_data: NodeData) -> None:
    for path in PAGES[:-1]:
        r = api.get(_fill(path, node_data))
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), path
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        assert "<script" not in r.text
    study = api.get(f"/ui/studies/{node_data.study_id}").text
    assert f"/ui/studies/{node_data.study_id}/results/{node_data.result_id}/coronal.png" in study
    assert 'id="retry-' in study and "Lesion" in study
    models = api.get("/ui/models").text
    n_models = len(api.get("/api/models").json()["items"])
    assert n_models == len(demo_model_paths())
    assert models.count("<svg") == 3 * n_models and "<polyline" in models
    for plane in ("axial", "coronal", "sagittal"):
        png = api.get(f"/ui/studies/{node_data.study_id}/results/{node_data.result_id}/"
                      f"{plane}.png")
        assert png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    assert api.get(f"/ui/studies/{node_data.study_id}/results/424242/axial.png"
                   ).status_code == 404
    assert api.get("/ui/studies/424242").status_code == 404


def test_forms_need_their_token(fresh_data: NodeData) -> None:
    with serving(fresh_data) as url, httpx.Client(base_url=url, auth=(USER, PASSWORD)) as ui:
        page = ui.get("/ui/outbox").text
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)  # type: ignore
        r = ui.post(f"/ui/outbox/{fresh_data.dead_item}/retry", data={"next": "/ui/outbox"})
        assert r.status_code == 403
        assert fresh_data.services.outbox.get(fresh_data.dead_item).status == "dead"
        r = ui.post(f"/ui/outbox/{fresh_data.dead_item}/retry",
                    data={"csrf": csrf, "next": "https://evil.example/"})
        assert r.status_code == 303 and r.headers["location"].startswith("/ui/outbox?")
        assert fresh_data.services.outbox.get(fresh_data.dead_item).status == "pending"
        assert "queued for delivery" in ui.get(r.headers["location"]).text


def test_no_phi_anywhere(api: httpx.Client, node_data: NodeData) -> None:
    for path in GETS + PAGES[:-1]:
        r = api.get(_fill(path, node_data))
        assert r.status_code == 200, path
        assert_no_phi(r.text, node_data.markers, path)


def test_services_over_a_database_another_process_runs(fresh_data: NodeData) -> None:
    from dicomnode.app import open_database

    engine, sessions = open_database(fresh_data.settings, upgrade=False)
    try:
        services = ApiServices.over(fresh_data.settings, sessions)
        import dataclasses

        data = dataclasses.replace(fresh_data, services=services)
        with serving(data) as url:
            r = httpx.post(f"{url}/api/outbox/{data.dead_item}/retry", auth=(USER, PASSWORD))
            assert r.status_code == 200 and r.json()["status"] == "pending"
            listing = httpx.get(f"{url}/api/studies", auth=(USER, PASSWORD)).json()
            assert listing["total"] == 2
        # the job is in the shared table, for the node's workers
        assert _send_jobs(fresh_data, data.dead_item)[-1].status == "todo"
    finally:
        engine.dispose()


def test_api_server_reports_a_port_in_use(node_data: NodeData, api_url: str) -> None:
    from opsdata import api_settings

    from dicomnode.api import ApiServer, create_api
    from dicomnode.errors import NodeError

    port = int(api_url.rsplit(":", 1)[1])
    server = ApiServer(create_api(node_data.services, api_settings()), "127.0.0.1", port)
    with pytest.raises(NodeError, match="did not start"):
        server.start()
    server.stop()


def test_a_repeated_query_parameter_is_refused(api: httpx.Client) -> None:
    # every API parameter is one value; FastAPI alone would take the last silently
    r = api.get("/api/jobs", params=[("queue", "gpu"), ("queue", "cpu")])
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["query", "queue"]
    assert api.get("/api/jobs", params={"queue": "gpu"}).status_code == 200
