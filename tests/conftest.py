"""
Session fixtures over the real peers in peers.py: three upstream registries
(anonymous, Basic, token auth), each started on first use and stopped at the
end of the session. Test modules import helpers with ``from peers import ...``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The helpers are importable as ``peers`` whether or not tests/ is a package.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import Registry, TokenServer

UPSTREAM_USER = "puller"
UPSTREAM_PASSWORD = "pullpass"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: starts real peer programs (docker-registry, skopeo, twistd)"
    )


@pytest.fixture(scope="session")
def upstream_anon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry without authentication."""
    registry = Registry(tmp_path_factory.mktemp("upstream-anon"))
    try:
        yield registry.start()
    finally:
        registry.stop()


@pytest.fixture(scope="session")
def upstream_basic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry with Basic auth; ``.username``, ``.password``, ``.creds``."""
    registry = Registry(
        tmp_path_factory.mktemp("upstream-basic"), "basic",
        username=UPSTREAM_USER, password=UPSTREAM_PASSWORD,
    )
    try:
        yield registry.start()
    finally:
        registry.stop()


@pytest.fixture(scope="session")
def upstream_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """
    A registry with Docker token auth against its own TokenServer
    (``.token_server``); ``.username``, ``.password``, ``.creds`` are what
    the token server accepts.
    """
    workdir = tmp_path_factory.mktemp("upstream-token")
    token_server = TokenServer(workdir / "token-server", {UPSTREAM_USER: UPSTREAM_PASSWORD})
    registry = Registry(
        workdir / "registry", "token", token_server=token_server,
        username=UPSTREAM_USER, password=UPSTREAM_PASSWORD,
    )
    try:
        token_server.start()
        yield registry.start()
    finally:
        registry.stop()
        token_server.stop()
