"""Serving the API from inside the node process: uvicorn in a daemon thread."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import uvicorn

from dicomnode.errors import NodeError

__all__ = ["ApiServer"]

log = logging.getLogger(__name__)


class ApiServer:
    """uvicorn serving one ASGI app on ``host:port`` in a thread of this process.

    Parameters
    ----------
    app
        The application (:func:`dicomnode.api.create_api`).
    host, port
        Where to listen; port 0 picks a free port (see :attr:`port` once started).
    """

    def __init__(self, app: Any, host: str, port: int) -> None:
        # log_config=None: uvicorn's loggers propagate to ours (configured by the CLI);
        # no access log (one line per request, scrapes included).
        self.config = uvicorn.Config(app, host=host, port=port, log_config=None,
                                     access_log=False, lifespan="off", server_header=False)
        self.server = uvicorn.Server(self.config)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port in use (after :meth:`start`)."""
        servers = getattr(self.server, "servers", [])
        for s in servers:
            for sock in s.sockets:
                return int(sock.getsockname()[1])
        return int(self.config.port)

    def start(self, timeout_s: float = 10.0) -> None:
        """Start serving; return once the socket listens.

        Raises
        ------
        NodeError
            The server did not start (port in use, address not available).
        """
        # uvicorn leaves signal handling alone outside the main thread: the CLI keeps it.
        self._thread = threading.Thread(target=self.server.run, name="api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise NodeError(f"API did not start on {self.config.host}:{self.config.port} "
                                "(port in use?)")
            time.sleep(0.02)
        log.info("API listening on http://%s:%d", self.config.host, self.port)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, finish running requests (up to ``timeout_s``), stop the thread."""
        if self._thread is None:
            return
        self.server.should_exit = True
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self.server.force_exit = True
            self._thread.join(1.0)
        self._thread = None
