"""``create_api``: the FastAPI application of one node (JSON API, /metrics, dashboard)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST

from dicomnode import __version__
from dicomnode.api.auth import Authenticator, current_user, resolve_token
from dicomnode.api.metrics_collector import database_registry, exposition
from dicomnode.api.routes import api_router, health_router
from dicomnode.api.services import ApiServices
from dicomnode.api.stow import PeerAuthenticator, stow_router
from dicomnode.api.ui import STATIC_DIR, ThumbnailCache, ui_router

__all__ = ["create_api"]

log = logging.getLogger(__name__)

_DESCRIPTION = """Operator API of a dicomnode: what arrived, where each study is in the
pipeline, what failed and why; outbox retry and drop; model versions, metrics,
promotion and rollback; jobs, queues and quarantine.

Everything here is pseudonymous: study and patient keys, states, counts, timings
and errors written by the node. Identities stay in the node's vault, which this
API never reads. Authenticate with the API token (`Authorization: Bearer ...`)
or a basic-auth user of `[api].users`."""

# HTML pages may load only our own styles and images; nothing may frame them.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def create_api(services: ApiServices, settings: Any) -> FastAPI:
    """The node's HTTP application.

    Parameters
    ----------
    services
        The node's stores (:class:`ApiServices`).
    settings
        The ``[api]`` settings (:class:`dicomnode.api.settings.ApiSettings`: ``token``,
        ``token_file``, ``users``, ``metrics_public``).

    Raises
    ------
    ConfigError
        ``api.token_file`` cannot be used.
    """
    data_dir = services.settings.data_dir.resolve()
    token = resolve_token(settings.token, settings.token_file, data_dir)
    auth = Authenticator(token, {n: p.get_secret_value() for n, p in settings.users.items()})
    app = FastAPI(title="dicomnode", version=__version__, description=_DESCRIPTION,
                  # the schema is served below, behind credentials; no Swagger UI (it
                  # would load scripts from a CDN, which the pages' policy forbids)
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.services = services
    app.state.thumbnails = ThumbnailCache()
    app.state.auth = auth
    database = database_registry(services)

    @app.middleware("http")
    async def _headers(request: Request,
                       call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        # Every query parameter of the API is a single value; FastAPI would silently
        # take the last of repeated ones (?queue=a&queue=b), so refuse them instead.
        keys = [k for k, _ in request.query_params.multi_items()]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated and request.url.path.startswith("/api/"):
            # in FastAPI's own validation-error shape (the schema's HTTPValidationError)
            response: Response = JSONResponse({"detail": [
                {"loc": ["query", k], "msg": "given more than once", "type": "value_error"}
                for k in repeated]}, status_code=422)
        else:
            response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Cache-Control", "no-store")
        if response.headers.get("content-type", "").startswith("text/html"):
            for k, v in _PAGE_HEADERS.items():
                response.headers.setdefault(k, v)
        return response

    app.include_router(health_router())
    app.include_router(api_router())
    if settings.stow:
        # peers' own credentials, not the operator's: see api/stow.py
        app.include_router(stow_router(PeerAuthenticator(services.settings)))

    metrics_deps = [] if settings.metrics_public else [Depends(current_user)]

    @app.get("/metrics", tags=["metrics"], dependencies=metrics_deps,
             response_class=Response, summary="Prometheus metrics",
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition"},
                        **({} if settings.metrics_public else {401: {
                            "description": "Credentials missing or not accepted"}})})
    def metrics() -> Response:
        return Response(exposition(database), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/openapi.json", include_in_schema=False,
             dependencies=[Depends(current_user)])
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    app.include_router(ui_router(auth))
    # Styles only (no secrets, no data): served without credentials so a browser's
    # first page load does not ask twice.
    app.mount("/ui/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def root() -> Response:
        return RedirectResponse("/ui/studies")

    return app
