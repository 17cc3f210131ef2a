"""``dicomnode serve`` with the operator API wired in, as the CLI will do it (test launcher).

Until the CLI and ``Node`` start the API themselves, the end-to-end test runs the
node through this script: the same calls in the same order (configure logging,
audit the configuration, create and start the node, serve the API from a thread;
on SIGTERM stop the API, then the node).

Usage: python serve_with_api.py CONFIG API_PORT AUDIT_PATH (API credentials in the
environment: OPS_API_TOKEN, OPS_API_USER, OPS_API_PASSWORD).
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from dicomnode.api import ApiServer, ApiServices, ApiSettings, create_api
from dicomnode.app import create_node
from dicomnode.audit import audit
from dicomnode.config import load_settings
from dicomnode.logsetup import configure_logging


def main() -> None:
    config, api_port, audit_path = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    settings = load_settings(config)
    configure_logging(settings.log_level, json_logs=True, audit_path=audit_path)
    digest = hashlib.sha256(settings.model_dump_json().encode()).hexdigest()
    audit("config_loaded", config_digest=digest, source=str(config))
    api_settings = ApiSettings(
        port=api_port, token=os.environ["OPS_API_TOKEN"],
        users={os.environ["OPS_API_USER"]: os.environ["OPS_API_PASSWORD"]})
    node = create_node(settings)
    node.start()
    api = ApiServer(create_api(ApiServices.from_context(node.ctx, node.sessions), api_settings),
                    api_settings.host, api_settings.port)
    api.start()
    audit("application_start", user=settings.ae_title, ae_title=settings.ae_title)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    logging.getLogger("dicomnode").info("serving (test launcher)")
    while not stop.wait(0.2):
        pass
    api.stop()
    node.stop()
    audit("application_stop", user=settings.ae_title, ae_title=settings.ae_title)


if __name__ == "__main__":
    main()
