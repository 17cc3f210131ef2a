"""The OpenAPI schema holds: schemathesis generates requests from it against the live API.

Every operation is called with generated parameters and bodies, valid (positive)
and invalid (negative), with the token; schemathesis checks status codes, content
types, headers and bodies against the schema, that no request makes a server
error, that invalid data is refused, and (``ignored_auth``) that a request
without credentials is refused.

The operations are enumerated inside one test: schemathesis' pytest plugin
(``from_fixture``) reads a private pytest attribute that pytest 9 removed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from opsdata import TOKEN, build_node_data, serving
from schemathesis import GenerationMode


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # its own data: generated POSTs (retry, drop, promote, rollback) change state
    data = build_node_data(Path(tmp_path_factory.mktemp("schema")))
    with serving(data) as url:
        yield url
    data.node.engine.dispose()


def _run(operation: Any, mode: GenerationMode, base_url: str) -> None:
    @given(case=operation.as_strategy(mode))
    @settings(max_examples=15, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case: Any) -> None:
        case.call_and_validate(base_url=base_url,
                               headers={"Authorization": f"Bearer {TOKEN}"})

    check()


def test_api_conforms_to_its_schema(live_api: str) -> None:
    schema = schemathesis.openapi.from_url(f"{live_api}/api/openapi.json",
                                           headers={"Authorization": f"Bearer {TOKEN}"})
    labels, failures = [], []
    for result in schema.get_all_operations():
        operation = result.ok()
        labels.append(operation.label)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _run(operation, mode, live_api)
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # nothing to make invalid
            except Exception as exc:  # collect all, report together
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    assert "GET /api/studies/{study_id}" in labels and "GET /metrics" in labels
    assert len(labels) >= 15
    assert not failures, "\n\n".join(failures)
