"""Fixtures of the operator-surface tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from opsdata import TOKEN, NodeData, build_node_data, serving


@pytest.fixture(scope="module")
def node_data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeData]:
    """One processed phantom study and the states an operator must see (opsdata.py)."""
    data = build_node_data(tmp_path_factory.mktemp("ops"))
    yield data
    data.node.engine.dispose()


@pytest.fixture(scope="module")
def api_url(node_data: NodeData) -> Iterator[str]:
    """The API over ``node_data``, served on a free port."""
    with serving(node_data) as url:
        yield url


@pytest.fixture
def api(api_url: str) -> Iterator[httpx.Client]:
    """An HTTP client of ``api_url`` with the token."""
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {TOKEN}"},
                      timeout=30) as client:
        yield client


@pytest.fixture
def fresh_data(tmp_path: Path) -> Iterator[NodeData]:
    """Like ``node_data``, for tests that change state."""
    data = build_node_data(tmp_path)
    yield data
    data.node.engine.dispose()
