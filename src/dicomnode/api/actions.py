"""The operator actions of the API and the dashboard, exactly as the CLI performs them.

* retry an outbox item = ``dicomnode outbox retry``: refused for a sent item; the row
  becomes ``pending`` with ``attempts = 0`` and no next attempt time, and one
  ``send_result`` job is enqueued (its own retries then follow ``[results]``);
* drop = ``dicomnode outbox drop``: the row becomes ``dropped`` (the object stays
  under ``results/``);
* promote = ``dicomnode models promote``: :meth:`ModelRegistry.activate`;
* rollback = ``dicomnode models rollback``: :meth:`ModelRegistry.rollback`;
* retry a study = ``dicomnode studies retry``: a study in a terminal outcome is
  processed again from its completion (a new pipeline run of the same version:
  de-identification of anything pending, routing, inference, results); its dead or
  unroutable deliveries are queued again.

Each success leaves an ``operator_action`` audit line naming the API user and
address (the registry adds its own ``model_promoted`` line).
"""

from __future__ import annotations

from dicomnode.api.auth import Principal
from dicomnode.api.services import ApiServices
from dicomnode.audit import audit
from dicomnode.errors import ModelError, NodeError
from dicomnode.storage.registry import RegisteredModel

__all__ = [
    "ActionRefused",
    "NotFound",
    "drop_outbox",
    "promote",
    "retry_outbox",
    "retry_study",
    "rollback",
]


class NotFound(NodeError, LookupError):
    """The item or model named does not exist (HTTP 404)."""


class ActionRefused(NodeError):
    """The action does not apply in the current state (HTTP 409)."""


def _audit(principal: Principal, action: str, **fields: object) -> None:
    audit("operator_action", user=principal.user, address=principal.address, action=action,
          **fields)


def retry_outbox(svc: ApiServices, item_id: int, principal: Principal) -> None:
    """Queue an outbox item for delivery again, with a fresh attempt count.

    Raises
    ------
    NotFound
        No such item.
    ActionRefused
        The item was sent already, or is already queued (a second send job could
        deliver it twice).
    """
    item = svc.outbox.get(item_id)
    if item is None:
        raise NotFound(f"outbox item {item_id} is unknown")
    if item.status == "sent":
        raise ActionRefused(f"outbox item {item_id} is sent")
    if item.status == "pending":
        raise ActionRefused(f"outbox item {item_id} is already queued for delivery")
    svc.outbox.update(item_id, status="pending", attempts=0, next_attempt_at=None)
    svc.enqueue("send_result", {"outbox_id": item_id})
    _audit(principal, "outbox_retry", outbox_id=item_id, previous_status=item.status)


def drop_outbox(svc: ApiServices, item_id: int, principal: Principal) -> None:
    """Give up on an outbox item: it will not be sent.

    Raises
    ------
    NotFound
        No such item.
    ActionRefused
        The item was sent already.
    """
    item = svc.outbox.get(item_id)
    if item is None:
        raise NotFound(f"outbox item {item_id} is unknown")
    if item.status == "sent":
        raise ActionRefused(f"outbox item {item_id} is sent")
    svc.outbox.update(item_id, status="dropped")
    _audit(principal, "outbox_drop", outbox_id=item_id, previous_status=item.status)


def promote(svc: ApiServices, name: str, version: str, reason: str | None,
            principal: Principal) -> RegisteredModel:
    """Make ``version`` the active one of ``name`` (bypassing the promotion gate).

    Raises
    ------
    NotFound
        No such model version.
    """
    reason = reason or f"promoted by {principal.user}"
    try:
        m = svc.registry.activate(name, version, reason=reason)
    except ModelError as exc:
        raise NotFound(str(exc)) from None
    _audit(principal, "model_promote", model=name, version=version, reason=reason)
    return m


def rollback(svc: ApiServices, name: str, reason: str | None,
             principal: Principal) -> RegisteredModel:
    """Re-activate the version that served before the current one.

    Raises
    ------
    NotFound
        No version of ``name`` is registered.
    ActionRefused
        No earlier version was ever active.
    """
    if not svc.registry.list(name):
        raise NotFound(f"no model {name}")
    reason = reason or f"rolled back by {principal.user}"
    try:
        m = svc.registry.rollback(name, reason=reason)
    except ModelError as exc:
        raise ActionRefused(str(exc)) from None
    _audit(principal, "model_rollback", model=name, version=m.version, reason=reason)
    return m


def retry_study(svc: ApiServices, study_id: int, principal: Principal) -> int:
    """Process a study again from its completion; return the new pipeline run number.

    Refused results of the current version are cleared so their models run again;
    dead and unroutable deliveries become pending again (the run's results stage
    queues them). Sent objects are never sent twice: result UIDs are deterministic.

    Raises
    ------
    NotFound
        No such study.
    ActionRefused
        The study is still receiving or being processed.
    """
    study = svc.index.study(study_id)
    if study is None:
        raise NotFound(f"study {study_id} is unknown")
    started = svc.index.start_retry(study_id)
    if started is None:
        raise ActionRefused(
            f"study {study_id} is {study.outcome}: only a study in a final outcome can be retried"
        )
    version, run = started
    svc.results.clear_failed(study_id, version)
    for item in svc.outbox.list(study_id=study_id):
        if item.study_version == version and item.status in ("dead", "unroutable"):
            svc.outbox.update(item.id, status="pending", attempts=0, next_attempt_at=None,
                              last_error=None)
    svc.enqueue("study_complete", {"study_id": study_id, "version": version},
                dedup_key=f"study_complete:{study_id}:{version}:r{run}")
    _audit(principal, "study_retry", study_key=study.study_key, study_id=study_id,
           version=version, run=run, previous_outcome=study.outcome)
    return run
