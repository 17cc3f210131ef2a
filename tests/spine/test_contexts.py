"""The SCP's supported presentation contexts: every storage SOP class with every transfer
syntax, copied per association without re-validating 7,650 UIDs (scp/server.py)."""

from __future__ import annotations

from copy import deepcopy

from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification

from dicomnode.config import ScpSettings
from dicomnode.scp.server import StorageServer


def fields(cx) -> tuple:  # noqa: ANN001
    return (cx.abstract_syntax, tuple(cx.transfer_syntax), cx.scu_role, cx.scp_role,
            cx.as_scu, cx.as_scp, cx.context_id, cx.result)


def test_contexts_are_complete_and_copy_like_a_deep_copy() -> None:
    server = StorageServer("DICOMNODE", ScpSettings(), [], ingestor=None)  # type: ignore[arg-type]
    ours = {cx.abstract_syntax: cx for cx in server.contexts}
    assert {cx.abstract_syntax for cx in AllStoragePresentationContexts} <= set(ours)
    assert {Verification, StorageCommitmentPushModel} <= set(ours)
    assert all(set(ours[cx.abstract_syntax].transfer_syntax) == set(ALL_TRANSFER_SYNTAXES)
               for cx in AllStoragePresentationContexts)
    # the same contexts pynetdicom's AE holds, field by field
    assert [fields(c) for c in server.contexts] == [fields(c) for c in server.ae.supported_contexts]
    commit = ours[StorageCommitmentPushModel]
    assert (commit.scu_role, commit.scp_role) == (False, True)

    copies = deepcopy(server.contexts)  # what pynetdicom does for every association
    assert [fields(c) for c in copies] == [fields(c) for c in server.contexts]
    assert all(a is not b and a._transfer_syntax is not b._transfer_syntax
               for a, b in zip(copies, server.contexts, strict=True))
    copies[0]._transfer_syntax.clear()  # a copy changed in place...
    assert len(server.contexts[0].transfer_syntax) == len(ALL_TRANSFER_SYNTAXES)  # ...alone
