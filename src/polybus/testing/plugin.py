"""pytest fixtures that parametrize tests over every backend.

``connect()`` opens a new :class:`~polybus.Bus` on the backend under test;
buses from one test share the same broker (or log directory), so several
buses act as several services. ``topic`` is a fresh topic name per test.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import polybus


@dataclass(frozen=True)
class BackendCase:
    """How to reach one backend under test."""

    name: str
    url: Callable[[Path], str]  #: the URL for one test, given its tmp_path
    unavailable: Callable[[], str | None] = lambda: None  #: why it cannot run, or None


BACKENDS: list[BackendCase] = [
    BackendCase("memory", lambda tmp: f"memory://{uuid.uuid4().hex}"),
    BackendCase("native", lambda tmp: f"native://{tmp / 'log'}"),
]


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(params=BACKENDS, ids=lambda case: case.name)
def backend(request: pytest.FixtureRequest) -> BackendCase:
    case: BackendCase = request.param
    reason = case.unavailable()
    if reason:
        if _in_ci():
            pytest.fail(f"{case.name} backend unavailable in CI: {reason}")
        pytest.skip(f"{case.name} backend unavailable: {reason}")
    return case


@pytest.fixture
def connect(backend: BackendCase, tmp_path: Path) -> Iterator[Callable[[], polybus.Bus]]:
    """A factory of buses on the backend under test; all are closed after the test."""
    url = backend.url(tmp_path)
    buses: list[polybus.Bus] = []

    def factory() -> polybus.Bus:
        bus = polybus.connect(url)
        buses.append(bus)
        return bus

    yield factory
    for bus in reversed(buses):
        bus.close()


@pytest.fixture
def topic() -> str:
    """A topic name no other test uses."""
    return f"t-{uuid.uuid4().hex[:12]}"
