"""The JSON API: health, studies, outbox, models, training runs, jobs, queues, quarantine.

Every route answers a pydantic model (so the OpenAPI schema is exact) and
documents its error answers; every route except ``/health/live`` needs
credentials (:mod:`dicomnode.api.auth`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Query, Request, status
from fastapi.responses import JSONResponse

from dicomnode.api import actions, queries
from dicomnode.api.auth import User, current_user
from dicomnode.api.schemas import (
    ErrorOut,
    HealthOut,
    JobList,
    ModelOut,
    ModelsOut,
    ModelVersionOut,
    OutboxItemOut,
    OutboxList,
    QuarantineList,
    QueuesOut,
    ReadinessOut,
    ReasonIn,
    StudyDetail,
    StudyList,
    TrainingRunList,
)
from dicomnode.api.services import ApiServices

__all__ = ["api_router", "health_router"]

_AUTH = {401: {"model": ErrorOut, "description": "Credentials missing or not accepted"}}
_NOT_FOUND = {404: {"model": ErrorOut, "description": "No such object"}}
_CONFLICT = {409: {"model": ErrorOut, "description": "Not possible in the current state"}}
_BAD_BODY = {400: {"model": ErrorOut, "description": "The body is not JSON"}}

OutboxStatus = Literal["pending", "sent", "dead", "dropped", "unroutable"]
JobStatus = Literal["todo", "running", "done", "failed"]
# Names and versions as the registry stores them (String(64)).
ModelName = Annotated[str, Path(min_length=1, max_length=64)]
ModelVersion = Annotated[str, Path(min_length=1, max_length=64)]
ItemId = Annotated[int, Path(ge=1, le=2**62)]


def _svc(request: Request) -> ApiServices:
    return request.app.state.services  # type: ignore[no-any-return]


Services = Annotated[ApiServices, Depends(_svc)]


def _fail(exc: Exception) -> HTTPException:
    code = (status.HTTP_404_NOT_FOUND if isinstance(exc, actions.NotFound)
            else status.HTTP_409_CONFLICT)
    return HTTPException(code, str(exc))


def health_router() -> APIRouter:
    """``/health/live``: no credentials, no database; the process answers."""
    router = APIRouter(tags=["health"])

    @router.get("/health/live", response_model=HealthOut, summary="The process is up")
    def live() -> HealthOut:
        return HealthOut()

    return router


def api_router() -> APIRouter:
    """Every authenticated JSON route."""
    router = APIRouter(dependencies=[Depends(current_user)], responses=_AUTH)

    @router.get("/health/ready", response_model=ReadinessOut, tags=["health"],
                responses={503: {"model": ReadinessOut, "description": "Not ready"}},
                summary="Database reachable, data directory writable, routed models active")
    def ready(svc: Services) -> Any:
        out = queries.readiness(svc)
        if out.status != "ready":
            return JSONResponse(out.model_dump(), status_code=503)
        return out

    @router.get("/api/studies", response_model=StudyList, tags=["studies"],
                summary="Studies (pseudonymous keys) with the state of each pipeline step")
    def list_studies(
        svc: Services,
        state: Annotated[Literal["receiving", "complete"] | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
        since: Annotated[float | None, Query(
            ge=0, description="Only studies received at or after (epoch seconds)")] = None,
    ) -> StudyList:
        return queries.studies(svc, state=state, limit=limit, offset=offset, since=since)

    @router.get("/api/studies/{study_id}", response_model=StudyDetail, tags=["studies"],
                responses=_NOT_FOUND,
                summary="One study: steps with timings, routing, results, outbox, errors")
    def get_study(svc: Services, study_id: ItemId) -> StudyDetail:
        out = queries.study_detail(svc, study_id)
        if out is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"study {study_id} is unknown")
        return out

    @router.post("/api/studies/{study_id}/retry", response_model=StudyDetail, tags=["studies"],
                 responses={**_NOT_FOUND, 409: {"description": "The study is not in a final "
                                                               "outcome"}},
                 summary="Process a study in a final outcome again (dicomnode studies retry)")
    def retry_study(svc: Services, user: User, study_id: ItemId) -> StudyDetail:
        try:
            actions.retry_study(svc, study_id, user)
        except actions.NotFound as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
        except actions.ActionRefused as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        out = queries.study_detail(svc, study_id)
        assert out is not None
        return out

    @router.get("/api/outbox", response_model=OutboxList, tags=["outbox"],
                summary="Result objects waiting for or done with delivery")
    def list_outbox(
        svc: Services,
        status_: Annotated[OutboxStatus | None, Query(alias="status")] = None,
        study_id: Annotated[int | None, Query(ge=1, le=2**62)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    ) -> OutboxList:
        return queries.outbox(svc, status=status_, study_id=study_id, limit=limit)

    @router.post("/api/outbox/{item_id}/retry", response_model=OutboxItemOut, tags=["outbox"],
                 responses={**_NOT_FOUND, **_CONFLICT},
                 summary="Send again now with a fresh attempt count (dicomnode outbox retry)")
    def retry(svc: Services, user: User, item_id: ItemId) -> OutboxItemOut:
        try:
            actions.retry_outbox(svc, item_id, user)
        except (actions.NotFound, actions.ActionRefused) as exc:
            raise _fail(exc) from None
        out = queries.outbox_item(svc, item_id)
        assert out is not None
        return out

    @router.post("/api/outbox/{item_id}/drop", response_model=OutboxItemOut, tags=["outbox"],
                 responses=_NOT_FOUND, summary="Give up on an item (dicomnode outbox drop)")
    def drop(svc: Services, user: User, item_id: ItemId) -> OutboxItemOut:
        try:
            actions.drop_outbox(svc, item_id, user)
        except actions.NotFound as exc:
            raise _fail(exc) from None
        out = queries.outbox_item(svc, item_id)
        assert out is not None
        return out

    @router.get("/api/models", response_model=ModelsOut, tags=["models"],
                summary="Model versions with held-out and production Dice, and drift")
    def list_models(svc: Services) -> ModelsOut:
        return queries.models(svc)

    @router.get("/api/models/{name}", response_model=ModelOut, tags=["models"],
                responses=_NOT_FOUND, summary="One model: its versions and drift records")
    def get_model(svc: Services, name: ModelName) -> ModelOut:
        found = queries.models(svc, name).items
        if not found:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no model {name}")
        return found[0]

    @router.post("/api/models/{name}/versions/{version}/promote",
                 response_model=ModelVersionOut, tags=["models"],
                 responses={**_NOT_FOUND, **_BAD_BODY},
                 summary="Put a version into service, bypassing the gate "
                         "(dicomnode models promote)")
    def promote(svc: Services, user: User, name: ModelName, version: ModelVersion,
                body: Annotated[ReasonIn | None, Body()] = None) -> ModelVersionOut:
        try:
            m = actions.promote(svc, name, version, body.reason if body else None, user)
        except actions.NotFound as exc:
            raise _fail(exc) from None
        out = queries.model_version(svc, m.name, m.version)
        assert out is not None
        return out

    @router.post("/api/models/{name}/rollback", response_model=ModelVersionOut,
                 tags=["models"], responses={**_NOT_FOUND, **_CONFLICT, **_BAD_BODY},
                 summary="Re-activate the previously active version "
                         "(dicomnode models rollback)")
    def rollback(svc: Services, user: User, name: ModelName,
                 body: Annotated[ReasonIn | None, Body()] = None) -> ModelVersionOut:
        try:
            m = actions.rollback(svc, name, body.reason if body else None, user)
        except (actions.NotFound, actions.ActionRefused) as exc:
            raise _fail(exc) from None
        out = queries.model_version(svc, m.name, m.version)
        assert out is not None
        return out

    @router.get("/api/training-runs", response_model=TrainingRunList, tags=["models"],
                summary="Retraining runs, newest first, with their dataset cards")
    def list_training_runs(
        svc: Services, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> TrainingRunList:
        return queries.training_runs(svc, limit=limit)

    @router.get("/api/jobs", response_model=JobList, tags=["jobs"],
                summary="Jobs, most recently updated first (failed = dead letter)")
    def list_jobs(
        svc: Services,
        status_: Annotated[JobStatus | None, Query(alias="status")] = None,
        queue: Annotated[str | None, Query(max_length=32)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> JobList:
        return queries.jobs(svc, status=status_, queue=queue, limit=limit)

    @router.get("/api/queues", response_model=QueuesOut, tags=["jobs"],
                summary="Queue depth per queue and status")
    def list_queues(svc: Services) -> QueuesOut:
        return queries.queues(svc)

    @router.get("/api/quarantine", response_model=QuarantineList, tags=["quarantine"],
                summary="Instances quarantined or failed de-identification")
    def list_quarantine(
        svc: Services, limit: Annotated[int, Query(ge=1, le=5000)] = 500,
    ) -> QuarantineList:
        return queries.quarantine(svc, limit=limit)

    return router
