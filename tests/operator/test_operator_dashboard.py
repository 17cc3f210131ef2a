"""End to end: a phantom study through the running node, the dashboard in headless Chromium.

The node runs as a process with the API wired in (serve_with_api.py); its PACS is
down, so both result objects go to the dead letter; then the PACS (dcmtk storescp)
comes up and an operator clicks Retry in the dashboard, and the object is delivered.
The PHI markers the study carries appear in no log line, audit line, API answer or page.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from nodeutil import DCMTK_ENV, NodeProcess, free_port, storescu, wait_for, wait_port, write_study
from opsdata import assert_no_phi, phi_strings, phi_study

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
TOKEN, USER, PASSWORD = "e2e-token-0123456789abcdef", "operator1", "e2e password"
LAUNCHER = Path(__file__).with_name("serve_with_api.py")

# Skipped without the browser, except under CI (``CI`` set), where its absence is a failure.
pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()) and not os.environ.get("CI"),
    reason="needs Debian chromium and chromium-driver (apt-get install chromium chromium-driver)")


class ApiNodeProcess(NodeProcess):
    """The node with its API, started by the test launcher instead of ``dicomnode serve``."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        super().__init__(workdir, config, env={"OPS_API_TOKEN": TOKEN, "OPS_API_USER": USER,
                                               "OPS_API_PASSWORD": PASSWORD})
        self.api_port = free_port()
        self.audit_path = workdir / "audit.jsonl"

    def start(self, wait_port_no: int | None = None) -> ApiNodeProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(LAUNCHER), str(self.config_path), str(self.api_port),
             str(self.audit_path)],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir)
        log.close()
        wait_port(self.port, proc=self.proc, timeout=60)
        wait_port(self.api_port, proc=self.proc, timeout=30)
        return self


def appears(browser: Any, by: str, value: str, timeout: float = 30) -> Any:
    """The element once the page that holds it has loaded (after a click that navigates)."""
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout).until(ec.presence_of_element_located((by, value)))


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--disable-dev-shm-usage",
                f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    # basic auth on every request of the page (images included), as a browser would
    # after its login prompt
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setExtraHTTPHeaders",
                           {"headers": {"Authorization": f"Basic {basic}"}})
    try:
        yield driver
    finally:
        driver.quit()


def _start_pacs(workdir: Path, port: int) -> subprocess.Popen[bytes]:
    out = workdir / "received"
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["/usr/bin/storescp", "-aet", "PACS", "-od", str(out), str(port)],
                            env=DCMTK_ENV, cwd=workdir, stdout=subprocess.DEVNULL,
                            stderr=open(workdir / "storescp.log", "wb"))
    wait_port(port, proc=proc)
    return proc


def test_dashboard_shows_the_study_and_retry_delivers(tmp_path: Path, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    pacs_port = free_port()  # nothing listens yet: the PACS is down
    study = phi_study(seed=9090)
    files = write_study(study, tmp_path / "src")
    markers = phi_strings(files)
    node = ApiNodeProcess(tmp_path / "node", {
        "completion": {"quiet_period_s": 1.0, "check_interval_s": 0.2},
        "storage": {"fsync": False},
        "peers": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port,
                           "allow_store": False}},
        "results": {"destinations": ["pacs"], "retry_base_s": 0.2, "retry_max_s": 0.5,
                    "max_attempts": 2, "timeout_s": 5.0},
    })
    pacs: subprocess.Popen[bytes] | None = None
    seen: dict[str, str] = {}  # where -> text, checked for PHI at the end
    try:
        node.start()
        api = httpx.Client(base_url=f"http://127.0.0.1:{node.api_port}", timeout=30,
                           headers={"Authorization": f"Bearer {TOKEN}"})
        assert storescu(node.port, files).returncode == 0
        dead = wait_for(lambda: (lambda b: b["items"] if len(b["items"]) == 2 else None)(
            api.get("/api/outbox", params={"status": "dead"}).json()), 120)
        [study_row] = api.get("/api/studies").json()["items"]
        seg = next(i for i in dead if i["kind"] == "SEG")
        sr = next(i for i in dead if i["kind"] == "SR")
        pacs = _start_pacs(tmp_path / "pacs", pacs_port)
        base = f"http://127.0.0.1:{node.api_port}"

        # the studies list shows the study with its steps
        browser.get(f"{base}/ui/studies")
        row = browser.find_element(By.ID, f"study-{study_row['id']}")
        assert study_row["study_key"] in row.text
        assert "infer" in row.text and "send" in row.text
        seen["/ui/studies"] = browser.page_source

        # the study page: three thumbnails with the overlay, the findings, the results
        row.find_element(By.LINK_TEXT, str(study_row["id"])).click()
        assert appears(browser, By.ID, "study-key").text == study_row["study_key"]
        detail = api.get(f"/api/studies/{study_row['id']}").json()
        [result] = detail["results"]
        for plane in ("axial", "coronal", "sagittal"):
            img = browser.find_element(By.ID, f"thumb-{result['id']}-{plane}")
            wait_for(lambda img=img: browser.execute_script(
                "return arguments[0].complete && arguments[0].naturalWidth", img), 30)
        overlay = browser.execute_script("""
            const img = document.getElementById(arguments[0]);
            const c = document.createElement('canvas');
            c.width = img.naturalWidth; c.height = img.naturalHeight;
            const g = c.getContext('2d'); g.drawImage(img, 0, 0);
            const d = g.getImageData(0, 0, c.width, c.height).data;
            let n = 0;
            for (let i = 0; i < d.length; i += 4) if (d[i] > 200 && d[i + 1] < 100) n++;
            return n;""", f"thumb-{result['id']}-axial")
        assert overlay > 20, "no lesion overlay in the model's colour (255, 64, 64)"
        findings = browser.find_elements(By.CSS_SELECTOR, "tr.finding")
        assert len(findings) == len(result["findings"]) >= 1
        assert "Lesion" in findings[0].text and "demo-lesion" in browser.page_source
        assert browser.find_element(By.ID, "step-infer").text.split()[1] == "done"
        assert browser.find_element(By.ID, "step-send").text.split()[1] == "failed"
        seen["/ui/studies/<id>"] = browser.page_source

        # the outbox: retry the dead SEG; it is delivered to the PACS now up
        browser.get(f"{base}/ui/outbox?status_filter=dead")
        browser.find_element(By.ID, f"retry-{seg['id']}").click()
        # click() returns before the POST's redirect has loaded: wait for the new page
        assert "queued for delivery" in appears(browser, By.ID, "notice").text

        def delivered() -> bool:
            browser.get(f"{base}/ui/outbox")
            return browser.find_element(By.ID, f"outbox-{seg['id']}").get_attribute(
                "data-status") == "sent"

        wait_for(delivered, 60, interval=0.5)
        seen["/ui/outbox"] = browser.page_source
        assert browser.find_element(By.ID, f"outbox-{sr['id']}").get_attribute(
            "data-status") == "dead"
        received = [f for f in (tmp_path / "pacs" / "received").iterdir() if f.is_file()]
        assert len(received) == 1
        assert study.study_instance_uid.encode() in received[0].read_bytes()  # re-identified
        for page in ("/ui/models", "/ui/training", "/ui/jobs", "/ui/quarantine",
                     f"/ui/studies/{study_row['id']}"):
            browser.get(base + page)
            seen[page] = browser.page_source
        assert "<svg" in seen["/ui/models"]

        for path in ("/api/studies", f"/api/studies/{study_row['id']}", "/api/outbox",
                     "/api/models", "/api/training-runs", "/api/jobs", "/api/queues",
                     "/api/quarantine", "/health/ready", "/api/openapi.json"):
            r = api.get(path)
            assert r.status_code == 200, path
            seen[path] = r.text
        metrics = api.get("/metrics").text
        seen["/metrics"] = metrics
        for line in ('dicomnode_instances_received_total 16.0',
                     'dicomnode_associations_total{event="accepted"}',
                     'dicomnode_send_failures_total{destination="pacs",outcome="dead"} 2.0',
                     'dicomnode_vault_reads_total{actor="reidentify"}',
                     'dicomnode_stage_seconds_count{stage="send"} 1.0',
                     'dicomnode_inference_seconds_count{model="demo-lesion",version="1.0.0"} 1.0',
                     'dicomnode_outbox_items{status="sent"} 1.0'):
            assert line in metrics, line
        attempts = next(ln for ln in metrics.splitlines()
                        if ln.startswith('dicomnode_send_attempts_total{destination="pacs"}'))
        assert float(attempts.split()[-1]) == 5.0  # 2 + 2 failed, 1 retried by the operator
    finally:
        if node.proc is not None and node.proc.poll() is None:
            assert node.stop() == 0
        if pacs is not None:
            pacs.terminate()
            pacs.wait(10)

    log_lines = node.log_text().splitlines()
    assert log_lines and all(json.loads(ln) for ln in log_lines)  # structured, every line
    audit_lines = [json.loads(ln) for ln in node.audit_path.read_text().splitlines()]
    events = [a["event"] for a in audit_lines]
    for event in ("config_loaded", "application_start", "association_accepted",
                  "deidentified", "vault_read", "reidentified", "result_sent",
                  "operator_action", "application_stop"):
        assert event in events, event
    sent = [a for a in audit_lines if a["event"] == "result_sent"]
    assert [a["EventOutcomeIndicator"] for a in sent].count(0) == 1
    assert [a["EventOutcomeIndicator"] for a in sent].count(4) == 4
    ok = next(a for a in sent if a["EventOutcomeIndicator"] == 0)
    assert ok["ActiveParticipant"][1]["AlternativeUserID"] == "AETITLES=PACS"
    assert ok["ParticipantObjectIdentification"][0]["ParticipantObjectID"] == \
        study_row["study_key"]
    retry = next(a for a in audit_lines if a["event"] == "operator_action")
    assert retry["ActiveParticipant"][0]["UserID"] == f"api:{USER}"
    assert retry["Detail"] == {"action": "outbox_retry", "outbox_id": seg["id"],
                               "previous_status": "dead"}
    deid = [a for a in audit_lines if a["event"] == "deidentified"]  # per study and run
    assert sum(a["Detail"]["instances"]["deidentified"] for a in deid) == 16, \
        [(a["Detail"], a.get("EventDateTime")) for a in deid]
    assert {a["ParticipantObjectIdentification"][0]["ParticipantObjectID"] for a in deid} == {
        study_row["study_key"]}
    # the trail goes to its own file only
    assert not [ln for ln in log_lines if json.loads(ln)["logger"] == "dicomnode.audit"]

    seen["node log"] = node.log_text()
    seen["audit trail"] = node.audit_path.read_text()
    for where, text in seen.items():
        assert_no_phi(text, markers, where)
    shutil.rmtree(tmp_path / "src")
