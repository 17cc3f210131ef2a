"""The dashboard: server-rendered pages under ``/ui`` (Jinja2, no JavaScript).

Pages render the same read models as the JSON API (:mod:`dicomnode.api.queries`),
so they show only what the API shows. Forms post back here with a per-user
form token (cross-site request protection) and redirect (303) to the page
they came from with a notice code; actions are those of :mod:`dicomnode.api.actions`.
"""

from __future__ import annotations

import datetime as _dt
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlencode

import jinja2
from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from dicomnode import __version__
from dicomnode.api import actions, charts, queries
from dicomnode.api.auth import Authenticator, Principal, User, current_user
from dicomnode.api.services import ApiServices
from dicomnode.api.thumbnails import render_explanation, render_result
from dicomnode.errors import NodeError

__all__ = ["ThumbnailCache", "templates", "ui_router"]

_HERE = Path(__file__).parent
STATIC_DIR = _HERE / "static"

_NOTICES = {
    "retried": "Outbox item {item} queued for delivery.",
    "dropped": "Outbox item {item} dropped: it will not be sent.",
    "promoted": "Model version {item} is active.",
    "rolled-back": "Rolled back: {item} is active again.",
}


def _ts(value: float | None) -> str:
    if value is None:
        return "–"
    return _dt.datetime.fromtimestamp(value, _dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _dur(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def _dice(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def templates() -> jinja2.Environment:
    """The dashboard's template environment (autoescaping on)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_HERE / "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(ts=_ts, dur=_dur, dice=_dice)
    env.globals["version"] = __version__
    return env


class ThumbnailCache:
    """The PNGs of the last results shown, by (result id, its time): plane -> PNG."""

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self._items: OrderedDict[tuple[Any, ...], dict[str, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, ...]) -> dict[str, bytes] | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key: tuple[Any, ...], planes: dict[str, bytes]) -> None:
        with self._lock:
            self._items[key] = planes
            while len(self._items) > self.size:
                self._items.popitem(last=False)


def _safe_next(value: str | None, default: str) -> str:
    # Only our own pages: never redirect to another site.
    if value and value.startswith("/ui/") and "//" not in value and "\\" not in value:
        return value
    return default


def ui_router(auth: Authenticator) -> APIRouter:
    """Every dashboard page and form (``auth`` makes and checks the form tokens)."""
    router = APIRouter(prefix="/ui", dependencies=[Depends(current_user)],
                       include_in_schema=False)
    env = templates()

    def svc_of(request: Request) -> ApiServices:
        return request.app.state.services  # type: ignore[no-any-return]

    def page(request: Request, user: Principal, name: str, **context: Any) -> HTMLResponse:
        notice = None
        code = request.query_params.get("notice")
        if code in _NOTICES:
            # the item shown is re-validated: only digits, dots, dashes and letters
            item = "".join(c for c in request.query_params.get("item", "")[:80]
                           if c.isalnum() or c in ".-_ ")
            notice = _NOTICES[code].format(item=item)
        html = env.get_template(name).render(
            request_path=request.url.path, user=user.user, csrf=auth.csrf_token(user),
            notice=notice, **context)
        return HTMLResponse(html)

    async def form(request: Request, user: Principal) -> dict[str, str]:
        # urlencoded forms parsed here: no python-multipart dependency for three fields
        body = (await request.body()).decode("utf-8", "replace")
        fields = {k: v[0] for k, v in parse_qs(body, max_num_fields=10).items()}
        auth.check_csrf(user, fields.get("csrf"))
        return fields

    def back(fields: dict[str, str], default: str, notice: str, item: str) -> Response:
        target = _safe_next(fields.get("next"), default)
        sep = "&" if "?" in target else "?"
        return RedirectResponse(f"{target}{sep}{urlencode({'notice': notice, 'item': item})}",
                                status_code=status.HTTP_303_SEE_OTHER)

    @router.get("/", response_class=HTMLResponse)
    def home() -> Response:
        return RedirectResponse("/ui/studies", status_code=status.HTTP_307_TEMPORARY_REDIRECT)

    @router.get("/studies", response_class=HTMLResponse)
    def studies_page(request: Request, user: User, offset: int = 0) -> HTMLResponse:
        svc = svc_of(request)
        listing = queries.studies(svc, limit=100, offset=max(0, offset))
        return page(request, user, "studies.html", title="Studies", studies=listing,
                    offset=max(0, offset), queues=queries.queues(svc).queues)

    @router.get("/studies/{study_id}", response_class=HTMLResponse)
    def study_page(request: Request, user: User, study_id: int) -> HTMLResponse:
        detail = queries.study_detail(svc_of(request), study_id)
        if detail is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"study {study_id} is unknown")
        shown = sorted((r for r in detail.results if r.status == "done"),
                       key=lambda r: (r.study_version != detail.version, -r.id))
        return page(request, user, "study.html", title=f"Study {detail.id}", study=detail,
                    shown=shown, planes=("axial", "coronal", "sagittal"))

    @router.get("/studies/{study_id}/results/{result_id}/{plane}.png",
                response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def thumbnail(request: Request, study_id: int, result_id: int,
                  plane: Literal["axial", "coronal", "sagittal"]) -> Response:
        svc = svc_of(request)
        result = svc.results.get(result_id)
        if result is None or result.study_id != study_id:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such result for this study")
        cache: ThumbnailCache = request.app.state.thumbnails
        key = (result.id, result.created_at)
        planes = cache.get(key)
        if planes is None:
            # all three at once: one pass over the files serves the page's three images
            try:
                planes = render_result(svc, result)
            except (LookupError, NodeError) as exc:
                raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
            cache.put(key, planes)
        png = planes[plane]
        return Response(png, media_type="image/png",
                        headers={"Cache-Control": "private, max-age=300"})

    @router.get("/studies/{study_id}/results/{result_id}/explain/{image}/{label}.png",
                response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def explanation(request: Request, study_id: int, result_id: int, image: int,
                    label: int) -> Response:
        svc = svc_of(request)
        result = svc.results.get(result_id)
        if result is None or result.study_id != study_id:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such result for this study")
        try:
            png = render_explanation(svc, result, image, label)
        except (LookupError, NodeError) as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
        return Response(png, media_type="image/png",
                        headers={"Cache-Control": "private, max-age=300"})

    @router.get("/outbox", response_class=HTMLResponse)
    def outbox_page(request: Request, user: User, status_filter: str | None = None
                    ) -> HTMLResponse:
        wanted = status_filter if status_filter in (
            "pending", "sent", "dead", "dropped", "unroutable") else None
        listing = queries.outbox(svc_of(request), status=wanted)
        return page(request, user, "outbox.html", title="Outbox", outbox=listing,
                    status_filter=wanted)

    @router.post("/studies/{study_id}/retry")
    async def study_retry(request: Request, user: User, study_id: int) -> Response:
        fields = await form(request, user)
        try:
            actions.retry_study(svc_of(request), study_id, user)
        except actions.NotFound as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
        except actions.ActionRefused as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        return back(fields, f"/ui/studies/{study_id}", "retried", f"study {study_id}")

    @router.post("/outbox/{item_id}/retry")
    async def outbox_retry(request: Request, user: User, item_id: int) -> Response:
        fields = await form(request, user)
        try:
            actions.retry_outbox(svc_of(request), item_id, user)
        except actions.NotFound as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
        except actions.ActionRefused as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        return back(fields, "/ui/outbox", "retried", str(item_id))

    @router.post("/outbox/{item_id}/drop")
    async def outbox_drop(request: Request, user: User, item_id: int) -> Response:
        fields = await form(request, user)
        try:
            actions.drop_outbox(svc_of(request), item_id, user)
        except actions.NotFound as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
        return back(fields, "/ui/outbox", "dropped", str(item_id))

    @router.get("/models", response_class=HTMLResponse)
    def models_page(request: Request, user: User) -> HTMLResponse:
        listing = queries.models(svc_of(request))
        drawn = []
        for m in listing.items:
            trend: dict[str, list[tuple[float, float]]] = {}
            for d in m.drift:
                trend.setdefault(d.model_version, []).append((d.at, d.mean_dice))
            bars = [(v.version, v.heldout_dice) for v in m.versions]
            prod = [(v.version, v.production_dice) for v in m.versions]
            drawn.append({
                "model": m,
                "heldout_svg": charts.bar_chart(bars, title=f"{m.name}: Dice per version "
                                                "(held-out or package validation)"),
                "production_svg": charts.bar_chart(prod, title=f"{m.name}: production Dice "
                                                   "per version"),
                "drift_svg": charts.line_chart(trend, title=f"{m.name}: Dice of production "
                                               "predictions against later labels"),
            })
        return page(request, user, "models.html", title="Models", models=drawn)

    @router.post("/models/{name}/versions/{version}/promote")
    async def model_promote(request: Request, user: User, name: str, version: str
                            ) -> Response:
        fields = await form(request, user)
        try:
            actions.promote(svc_of(request), name, version, fields.get("reason") or None, user)
        except actions.NotFound as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
        return back(fields, "/ui/models", "promoted", f"{name} {version}")

    @router.post("/models/{name}/rollback")
    async def model_rollback(request: Request, user: User, name: str) -> Response:
        fields = await form(request, user)
        try:
            m = actions.rollback(svc_of(request), name, fields.get("reason") or None, user)
        except actions.NotFound as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
        except actions.ActionRefused as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        return back(fields, "/ui/models", "rolled-back", f"{m.name} {m.version}")

    @router.get("/training", response_class=HTMLResponse)
    def training_page(request: Request, user: User) -> HTMLResponse:
        return page(request, user, "training.html", title="Training runs",
                    runs=queries.training_runs(svc_of(request)).items)

    @router.get("/jobs", response_class=HTMLResponse)
    def jobs_page(request: Request, user: User) -> HTMLResponse:
        svc = svc_of(request)
        return page(request, user, "jobs.html", title="Jobs", queues=queries.queues(svc).queues,
                    failed=queries.jobs(svc, status="failed").items,
                    recent=queries.jobs(svc, limit=30).items)

    @router.get("/quarantine", response_class=HTMLResponse)
    def quarantine_page(request: Request, user: User) -> HTMLResponse:
        return page(request, user, "quarantine.html", title="Quarantine",
                    items=queries.quarantine(svc_of(request)).items)

    return router
