"""pytest fixtures that parametrize tests over every backend.

``connect()`` opens a new :class:`~polybus.Bus` on the backend under test;
buses from one test share the same broker (or log directory), so several
buses act as several services. ``topic`` is a fresh topic name per test.
``proxied`` puts a :class:`~polybus.testing.proxy.TcpProxy` between the bus
and a network broker, for fault tests.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

import polybus

from . import servers
from .proxy import TcpProxy


@dataclass(frozen=True)
class BackendCase:
    """How to reach one backend under test."""

    name: str
    url: Callable[[Path], str]  #: the URL for one test, given its tmp_path
    unavailable: Callable[[], str | None] = lambda: None  #: why it cannot run, or None
    #: a URL whose connections pass through a TcpProxy, for network backends
    proxied: Callable[[], AbstractContextManager[tuple[str, TcpProxy]]] | None = None
    #: test name -> why this broker is expected to fail it (a known broker gap)
    gaps: Callable[[], dict[str, str]] = field(default=dict)


def with_options(url: str, **options: object) -> str:
    """``url`` with query options added, e.g. ``with_options(url, reconnect_timeout=2)``."""
    extra = "&".join(f"{k}={v}" for k, v in options.items())
    return f"{url}{'&' if '?' in url else '?'}{extra}" if extra else url


def _through(url: str, port: int) -> str:
    parts = urlsplit(url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}127.0.0.1:{port}"))


@contextmanager
def _proxied_url(url: str, default_port: int) -> Iterator[tuple[str, TcpProxy]]:
    parts = urlsplit(url)
    with TcpProxy(parts.hostname or "127.0.0.1", parts.port or default_port) as proxy:
        yield _through(url, proxy.port), proxy


@contextmanager
def proxied_kafka() -> Iterator[tuple[str, TcpProxy]]:
    """``(url, proxy)``: the suite's own Kafka broker, reached only through ``proxy``."""
    kafka = servers.local_kafka()
    if kafka is None or kafka.kind == "container":
        pytest.skip(
            "Kafka fault tests need the broker the suite starts: unset POLYBUS_KAFKA_BOOTSTRAP"
        )
    with kafka.behind_proxy() as (bootstrap, proxy):
        yield f"kafka://{bootstrap}", proxy


_TANSU_GAPS = dict.fromkeys(
    ("test_lag_counts_uncommitted_messages", "test_stats_show_end_offsets_and_each_groups_lag"),
    "Tansu reports wrong high watermarks, so lag computed from them is wrong",
)

BACKENDS: list[BackendCase] = [
    BackendCase("memory", lambda tmp: f"memory://{uuid.uuid4().hex}"),
    BackendCase("native", lambda tmp: f"native://{tmp / 'log'}"),
    BackendCase(
        "kafka",
        lambda tmp: f"kafka://{servers.kafka_bootstrap()}",
        servers.kafka_unavailable,
        proxied_kafka,
        lambda: _TANSU_GAPS if servers.kafka_is_tansu() else {},
    ),
    BackendCase(
        "rabbitmq",
        lambda tmp: servers.rabbitmq_url(),
        servers.rabbitmq_unavailable,
        lambda: _proxied_url(servers.rabbitmq_url(), 5672),
    ),
    BackendCase(
        "redis",
        lambda tmp: servers.redis_url(),
        servers.redis_unavailable,
        lambda: _proxied_url(servers.redis_url(), 6379),
    ),
]


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_server(name: str, reason: str | None) -> None:
    """Skip the test when ``reason`` says a server is missing, or fail it when ``CI=true``."""
    if reason:
        if _in_ci():
            pytest.fail(f"{name} backend unavailable in CI: {reason}")
        pytest.skip(f"{name} backend unavailable: {reason}")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--polybus-url",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="run the conformance suites on the backend URL opens (a scheme a package "
        "registered, e.g. nats=nats://localhost:4222) instead of the built-in backends; "
        "repeat for several",
    )


def backend_cases(config: pytest.Config) -> list[BackendCase]:
    """The backends the suites run on: those ``--polybus-url`` names, else :data:`BACKENDS`."""
    given: list[str] = config.getoption("polybus_url")
    cases = []
    for item in given:
        name, equals, url = item.partition("=")
        if not equals or "://" not in url:
            raise pytest.UsageError(
                f"--polybus-url wants NAME=URL, e.g. nats=nats://host; got {item!r}"
            )
        cases.append(BackendCase(name, functools.partial(_fixed, url)))
    return cases or BACKENDS


def _fixed(url: str, tmp: Path) -> str:
    return url


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" not in metafunc.fixturenames:
        return
    if any("backend" in str(m.args[0]) for m in metafunc.definition.iter_markers("parametrize")):
        return  # the test picks its backends itself
    cases = backend_cases(metafunc.config)
    metafunc.parametrize("backend", cases, ids=[case.name for case in cases], indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> BackendCase:
    """The backend under test (one per backend the suites run on)."""
    case: BackendCase = request.param
    require_server(case.name, case.unavailable())
    mark_gap(request, case.gaps())
    return case


def mark_gap(
    request: pytest.FixtureRequest,
    gaps: dict[str, str] | None = None,
    unreliable: dict[str, str] | None = None,
) -> None:
    """Mark the requesting test expected to fail, for the server under test only, when
    ``gaps`` (test name -> why that server cannot pass it) names it. Strictly: a gap the
    server closes turns into a failure, to be removed from ``gaps``. Skip the test when
    ``unreliable`` names it instead: the server fails it only now and then, so neither
    outcome would say anything."""
    name = getattr(request.node, "originalname", request.node.name)
    if reason := (unreliable or {}).get(name):
        pytest.skip(reason)
    if reason := (gaps or {}).get(name):
        request.node.add_marker(pytest.mark.xfail(reason=reason, strict=True))


@pytest.fixture
def connect(backend: BackendCase, tmp_path: Path) -> Iterator[Callable[..., polybus.Bus]]:
    """A factory of buses on the backend under test; all are closed after the test.

    Keyword arguments become URL options, e.g. ``connect(reconnect_timeout=2)``.
    """
    url = backend.url(tmp_path)
    buses: list[polybus.Bus] = []

    def factory(**options: object) -> polybus.Bus:
        bus = polybus.connect(with_options(url, **options))
        buses.append(bus)
        return bus

    yield factory
    for bus in reversed(buses):
        bus.close()
    if backend.name == "rabbitmq":  # exchanges and queues outlive their buses
        for declared in {t for bus in buses for t in bus.declared}:
            # a pattern's own topics are read by a group named like the topic
            servers.rabbitmq_delete_topic(declared, (*GROUPS, declared))


@dataclass
class Proxied:
    """Buses whose broker connections pass through ``proxy``."""

    url: str
    proxy: TcpProxy
    buses: list[polybus.Bus] = field(default_factory=list)

    def connect(self, **options: object) -> polybus.Bus:
        bus = polybus.connect(with_options(self.url, **options))
        self.buses.append(bus)
        return bus


@pytest.fixture
def proxied(backend: BackendCase) -> Iterator[Proxied]:
    """The backend under test behind a TCP proxy; skips backends without a network."""
    if backend.proxied is None:
        pytest.skip(f"{backend.name} has no network connection to cut")
    with backend.proxied() as (url, proxy):
        p = Proxied(url, proxy)
        try:
            yield p
        finally:
            proxy.unblock()
            for bus in reversed(p.buses):
                bus.close()


#: the group names the conformance suites use (so their RabbitMQ queues can be deleted)
GROUPS = (
    "g", "h", "workers", "billing", "shipping", "email", "payment", "inventory", "responders"
)  # fmt: skip


@pytest.fixture
def topic(request: pytest.FixtureRequest) -> Iterator[str]:
    """A topic name no other test uses (its broker objects are deleted afterwards)."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    yield name
    callspec = getattr(request.node, "callspec", None)
    case = callspec.params.get("backend") if callspec else None
    if isinstance(case, BackendCase) and case.name == "redis":
        servers.redis_delete_topic(f"{name}*")  # with the topics patterns derive from it
    elif isinstance(case, BackendCase) and case.name == "rabbitmq":
        servers.rabbitmq_delete_topic(name, GROUPS)
