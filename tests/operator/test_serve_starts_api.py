"""`dicomnode serve` starts the operator API next to the SCP and stops it with the node."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from nodeutil import NodeProcess, free_port, wait_port

TOKEN = "serve-test-token-0123456789"


def get(url: str, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_serve_runs_the_api_and_audits_its_start(tmp_path: Path) -> None:
    port = free_port()
    node = NodeProcess(tmp_path, {"api": {"enabled": True, "port": port, "token": TOKEN}})
    with node:
        wait_port(port)
        base = f"http://127.0.0.1:{port}"
        assert get(f"{base}/health/live")[0] == 200
        assert get(f"{base}/api/studies")[0] == 401
        status, body = get(f"{base}/api/studies", TOKEN)
        assert status == 200 and json.loads(body) is not None
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{base}/health/live", timeout=2)
    events = [json.loads(line)["event"] for line in
              (node.data_dir / "audit.jsonl").read_text().splitlines()]
    assert events[0] == "config_loaded"
    assert "application_start" in events and events[-1] == "application_stop"
