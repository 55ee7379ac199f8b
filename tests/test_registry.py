"""One registry of URL schemes: a third-party package adds a scheme with an entry point,
and the shipped conformance suite runs on it without any change to polybus."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import polybus
from polybus import BackendUnavailable, ConfigurationError
from polybus.patterns.inbox import MemoryInbox, NativeInbox, open_inbox
from polybus.registry import opener, register, schemes


@pytest.fixture
def toy_package(tmp_path: Path) -> Path:
    """An installed distribution ``toy-bus`` registering ``toy://`` for buses, session
    stores and inboxes (each the memory implementation under another name)."""
    site = tmp_path / "site"
    info = site / "toy_bus-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-bus\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        textwrap.dedent("""\
            [polybus.backends]
            toy = toy_bus:bus

            [polybus.session_stores]
            toy = toy_bus:sessions

            [polybus.inboxes]
            toy = toy_bus:inbox
        """)
    )
    (site / "toy_bus.py").write_text(
        textwrap.dedent("""\
            import uuid

            from polybus.adapters import native
            from polybus.patterns.inbox import MemoryInbox
            from polybus.sessions.stores import memory


            def bus(url):
                # a private log per bus URL path, as a networked backend's topics would be
                return native.from_url("memory://toy-" + url.partition("://")[2])


            def sessions(url, **options):
                return memory.from_url("memory://toy", **options)


            def inbox(url, **options):
                return MemoryInbox(**options)
        """)
    )
    return site


def run(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        check=False,
    )


def test_a_package_adds_a_scheme_for_buses_stores_and_inboxes(toy_package: Path) -> None:
    code = textwrap.dedent("""\
        import polybus
        from polybus.patterns.inbox import open_inbox
        from polybus.sessions.stores import open_store

        with polybus.connect("toy://a") as bus:
            bus.publish("t", "hello")
            with bus.subscribe("t", "g") as sub:
                print([d.value for d in sub.fetch(10, 1.0)] or "nothing")
        print(type(open_store("toy://s")).__name__, type(open_inbox("toy://i")).__name__)
    """)
    done = run(toy_package, "-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["['hello']", "MemoryStore MemoryInbox"]


def test_the_shipped_conformance_suite_runs_on_a_registered_scheme(
    toy_package: Path, tmp_path: Path
) -> None:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["polybus.testing.plugin"]\n')
    (tmp_path / "test_toy.py").write_text("from polybus.testing.conformance import *  # noqa\n")
    done = run(
        toy_package,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:randomly",
        "-k",
        "publish or group",
        "--polybus-url",
        "toy=toy://suite",
        str(tmp_path / "test_toy.py"),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert " passed" in summary, summary
    assert "failed" not in summary, summary
    assert "error" not in summary, summary
    assert int(summary.split(" passed")[0].split()[-1]) >= 5, summary  # the suite really ran


def test_register_a_callable_in_a_program() -> None:
    register("inbox", "scratch", lambda url, **options: MemoryInbox(**options))
    assert "scratch" in schemes("inbox")
    assert isinstance(open_inbox("scratch://"), MemoryInbox)


def test_the_built_in_inboxes_open_by_url(tmp_path: Path) -> None:
    assert isinstance(open_inbox("memory://"), MemoryInbox)
    inbox = open_inbox(f"native://{tmp_path / 'inbox'}", ttl=60)
    try:
        assert isinstance(inbox, NativeInbox)
        assert inbox.ttl == 60
    finally:
        inbox.close()


@pytest.mark.parametrize("kind", ["bus", "sessions", "inbox"])
def test_an_unknown_scheme_names_the_entry_point_group(kind: str) -> None:
    with pytest.raises(BackendUnavailable, match=r"unknown URL scheme 'nats'.*polybus\."):
        opener(kind, "nats://localhost")  # type: ignore[arg-type]


def test_a_string_without_a_scheme_is_refused_with_examples() -> None:
    with pytest.raises(ConfigurationError, match="expected scheme://"):
        polybus.connect("localhost:9092")
