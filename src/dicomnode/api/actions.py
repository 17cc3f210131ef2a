"""The operator actions of the API and the dashboard, exactly as the CLI performs them.

* retry an outbox item = ``dicomnode outbox retry``: refused for a sent item; the row
  becomes ``pending`` with ``attempts = 0`` and no next attempt time, and one
  ``send_result`` job is enqueued (its own retries then follow ``[results]``);
* drop = ``dicomnode outbox drop``: the row becomes ``dropped`` (the object stays
  under ``results/``);
* promote = ``dicomnode models promote``: :meth:`ModelRegistry.activate`;
* rollback = ``dicomnode models rollback``: :meth:`ModelRegistry.rollback`.

Each success leaves an ``operator_action`` audit line naming the API user and
address (the registry adds its own ``model_promoted`` line).
"""

from __future__ import annotations

from dicomnode.api.auth import Principal
from dicomnode.api.services import ApiServices
from dicomnode.audit import audit
from dicomnode.errors import ModelError, NodeError
from dicomnode.storage.registry import RegisteredModel

__all__ = ["ActionRefused", "NotFound", "drop_outbox", "promote", "retry_outbox", "rollback"]


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
