"""Workers as processes and dead letters from the shell, on the native engine.

The behaviour of consumers, retries and dead letters on every backend is in the
patterns conformance suite; this checks what a process adds: the command line,
signals, the health endpoint, and bad input.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

import polybus
from polybus import ConfigurationError, Message
from polybus.cli import main
from polybus.patterns.consumer import derived_id
from polybus.patterns.dlq import DeadLetters
from polybus.patterns.inbox import MemoryInbox
from polybus.patterns.retry import NO_RETRY, Retry, RetryPolicy
from polybus.patterns.worker import App, Consumer, Worker
from polybus.testing import servers
from polybus.testing.plugin import require_server
from polybus.testing.proxy import TcpProxy

DEADLINE = 20.0

APP = """
import os, time
from polybus.patterns.worker import App

app = App(os.environ["BUS_URL"])
out = open(os.environ["OUT"], "a", buffering=1)

@app.consumer("jobs", group="workers")
def work(d):
    out.write(f"start {d.message.value}\\n")
    time.sleep(float(os.environ.get("SLOW", "0")))
    out.write(f"done {d.message.value}\\n")
"""


def _wait_for(condition: Callable[[], bool], what: str, poll: Consumer | None = None) -> None:
    """Wait until ``condition()``, polling ``poll`` meanwhile; fail after DEADLINE."""
    end = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < end, f"{what} did not happen in time"
        if poll is None:
            time.sleep(0.02)
        else:
            poll.poll(0.05)


def _start_worker(
    tmp_path: Path, *args: str, slow: float = 0.0, bus_url: str | None = None
) -> subprocess.Popen[str]:
    (tmp_path / "jobs_app.py").write_text(APP)
    env = {
        **os.environ,
        "BUS_URL": bus_url or f"native://{tmp_path / 'bus'}",
        "OUT": str(tmp_path / "out.txt"),
        "SLOW": str(slow),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "polybus.cli", "worker", "jobs_app:app", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@contextmanager
def _worker_with_health(
    tmp_path: Path, *, slow: float = 0.0, bus_url: str | None = None
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """The worker command with a health endpoint: (the process, its health URL); killed
    afterwards."""
    proc = _start_worker(tmp_path, "--health-port", "0", slow=slow, bus_url=bus_url)
    try:
        assert proc.stdout is not None
        health = ""
        while not health:
            line = proc.stdout.readline()
            assert line, "the worker exited before serving health"
            if "/health" in line:
                health = line.split(" on ", 1)[1].strip()
        yield proc, health
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _health(url: str) -> tuple[int, dict[str, Any]]:
    """The health endpoint's status code and report (503 included)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def _lines(tmp_path: Path) -> list[str]:
    path = tmp_path / "out.txt"
    return path.read_text().splitlines() if path.exists() else []


def test_worker_process_stops_on_sigterm_after_finishing_what_it_started(
    tmp_path: Path,
) -> None:
    url = f"native://{tmp_path / 'bus'}"
    with polybus.connect(url) as bus:
        bus.declare("jobs", partitions=1, groups=["workers"])
        bus.publish_many("jobs", list(range(50)))
    with _worker_with_health(tmp_path, slow=0.2) as (proc, health):
        # 503 until the consumers run: health is served first
        _wait_for(lambda: _health(health)[0] == 200, "health to say ok")
        report = _health(health)[1]
        assert report["status"] == "ok"
        assert report["consumers"]["jobs:workers"]["alive"] is True
        _wait_for(lambda: any(line.startswith("start") for line in _lines(tmp_path)), "a start")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE) == 0
    lines = _lines(tmp_path)
    started = {line.split()[1] for line in lines if line.startswith("start")}
    done = {line.split()[1] for line in lines if line.startswith("done")}
    assert started == done, "SIGTERM cut a running handler short"
    assert len(done) < 50, "the worker did not stop taking work"

    # what it did not take is still there, and nothing it finished comes back
    with polybus.connect(url) as bus, bus.subscribe("jobs", "workers") as sub:
        rest: list[int] = []
        while batch := sub.fetch(100, timeout=0.5):
            rest += [d.message.value for d in batch]
    assert sorted(rest) == sorted(set(range(50)) - {int(v) for v in done})


def test_worker_command_refuses_what_is_not_an_app(tmp_path: Path) -> None:
    (tmp_path / "not_an_app.py").write_text("app = 42\n")
    proc = subprocess.run(
        [sys.executable, "-m", "polybus.cli", "worker", "not_an_app:app", "--url", "memory://"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert proc.returncode == 1
    assert "not a polybus App" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "polybus.cli", "worker", "no_such_module:app"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert proc.returncode == 1
    assert "cannot load 'no_such_module:app'" in proc.stderr


def test_dlq_commands_list_show_redrive_and_purge(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"native://{tmp_path / 'bus'}"
    with polybus.connect(url) as bus:
        bus.declare("orders", partitions=1, groups=["billing"])
        consumer = Consumer(bus, "orders", _always_fails, group="billing", retry=NO_RETRY).start()
        sent = [Message({"order": n}) for n in range(3)]
        bus.publish_many("orders", sent)
        _wait_for(lambda: consumer.stats.dead_lettered == 3, "dead-lettering", consumer)
        consumer.stop()

    assert main(["dlq", "list", url, "orders", "billing"]) == 0
    out = capsys.readouterr().out
    assert all(m.id in out for m in sent)
    assert "exhausted" in out
    assert "ValueError: card declined" in out

    assert main(["dlq", "show", url, "orders", "billing", sent[1].id]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["value"] == {"order": 1}
    assert (shown["topic"], shown["group"], shown["attempts"]) == ("orders", "billing", 1)

    assert main(["dlq", "redrive", url, "orders", "billing"]) == 1  # neither ids nor --all
    assert "--all" in capsys.readouterr().err
    assert main(["dlq", "redrive", url, "orders", "billing", "no-such-id"]) == 1
    assert "no-such-id" in capsys.readouterr().err
    assert main(["dlq", "redrive", url, "orders", "billing", sent[0].id]) == 0
    assert main(["dlq", "purge", url, "orders", "billing", sent[1].id]) == 0
    capsys.readouterr()
    assert main(["dlq", "list", url, "orders", "billing", "--json"]) == 0
    assert [entry["id"] for entry in json.loads(capsys.readouterr().out)] == [sent[2].id]
    assert main(["dlq", "purge", url, "orders", "billing", "--all"]) == 0
    assert "purged 1" in capsys.readouterr().out

    with polybus.connect(url) as bus:
        redriven: list[object] = []
        again = Consumer(
            bus, "orders", lambda d: redriven.append(d.message.value), group="billing"
        ).start()
        _wait_for(lambda: bool(redriven), "the re-drive", again)
        again.stop()
        assert redriven == [{"order": 0}]
        with DeadLetters(bus, "orders", "billing", wait=0.2) as dead:
            assert dead.list() == []


def _always_fails(d: polybus.Delivery) -> None:
    raise ValueError("card declined")


def test_bad_options_are_refused_with_what_to_do() -> None:
    with polybus.connect("memory://") as bus:
        with pytest.raises(ConfigurationError, match="inbox"):
            Consumer(bus, "t", _always_fails, guarantee="exactly-once")
        with pytest.raises(ConfigurationError, match="guarantee must be"):
            Consumer(bus, "t", _always_fails, guarantee="twice")  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="concurrency=1"):
            Consumer(bus, "t", _always_fails, transactional=True, concurrency=4)
        with pytest.raises(ConfigurationError, match="max_attempts"):
            RetryPolicy(max_attempts=0)
        with pytest.raises(ConfigurationError, match="jitter"):
            RetryPolicy(jitter=2)
        with pytest.raises(ConfigurationError, match=">= 0"):
            Retry(delay=-1)
        with pytest.raises(ConfigurationError, match="no bus to run on"):
            Worker(App())


def test_a_bad_registration_is_refused_at_decoration_not_when_a_worker_starts() -> None:
    app = App("memory://")
    with pytest.raises(ConfigurationError, match=r"concurency.*the options are .*concurrency"):
        app.consumer("t", concurency=4)
    with pytest.raises(ConfigurationError, match="guarantee must be"):
        app.consumer("t", guarantee="exactly_once")
    with pytest.raises(ConfigurationError, match="inbox"):
        app.consumer("t", guarantee="exactly-once")
    with pytest.raises(ConfigurationError, match="do not combine"):
        app.consumer("t", transactional=True, inbox=MemoryInbox())
    with pytest.raises(ConfigurationError, match="unexpected keyword"):
        app.responder("t", retries=3)
    assert app.registrations == []


def test_worker_run_outside_the_main_thread_says_what_to_use() -> None:
    worker = Worker(App("memory://"))
    raised: list[BaseException] = []

    def run() -> None:
        try:
            worker.run()
        except ConfigurationError as exc:
            raised.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert len(raised) == 1
    assert "worker.start() and worker.stop()" in str(raised[0])
    worker.stop()


def test_backoff_grows_caps_and_spreads() -> None:
    policy = RetryPolicy(initial_delay=1.0, multiplier=2.0, max_delay=5.0, jitter=0.5)
    delays = [[policy.delay(attempt) for _ in range(200)] for attempt in (1, 2, 3, 4, 5)]
    assert all(0.5 <= d <= 1.0 for d in delays[0])
    assert all(1.0 <= d <= 2.0 for d in delays[1])
    assert all(2.5 <= d <= 5.0 for d in delays[3] + delays[4])  # capped at max_delay
    assert len({round(d, 6) for d in delays[1]}) > 100, "no jitter"
    assert policy.delay(1, Retry(delay=7.5)) == 7.5
    assert not policy.retries(ValueError(), policy.max_attempts)
    assert not RetryPolicy(give_up_on=(KeyError,)).retries(KeyError(), 1)
    assert not RetryPolicy(retry_on=(OSError,)).retries(ValueError(), 1)
    assert RetryPolicy(retry_on=(OSError,)).retries(Retry(), 1)


def test_derived_ids_are_stable_distinct_and_uuid_shaped() -> None:
    import uuid

    first = [derived_id("parent", n) for n in range(100)]
    assert first == [derived_id("parent", n) for n in range(100)]
    assert len(set(first)) == 100
    assert derived_id("other", 0) not in first
    parsed = uuid.UUID(first[0])
    assert parsed.version == 8
    assert parsed.variant == uuid.RFC_4122


def test_health_reports_a_stuck_consumer(tmp_path: Path) -> None:
    app = App()

    @app.consumer("t", group="g", session_timeout=0.5)
    def stuck(d: polybus.Delivery) -> None:
        time.sleep(3)

    with polybus.connect("memory://") as bus:
        worker = Worker(app, bus, stop_timeout=5).start()
        port = worker.serve_health(0)
        bus.publish("t", "x")
        _wait_for(lambda: worker.health()["status"] == "failing", "the failing check")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
        assert err.value.code == 503
        err.value.close()
        assert worker.stop() is True
        assert worker.health()["status"] == "stopped"


def test_inspect_commands_say_why_they_see_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such-log"
    assert main(["topics", f"native://{missing}"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not missing.exists(), "inspecting created the directory"
    assert main(["groups", "memory://", "orders"]) == 1
    assert "process of its own" in capsys.readouterr().err


def test_tail_shows_every_partition_by_time_unless_one_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"native://{tmp_path / 'bus'}"
    with polybus.connect(url) as bus:
        bus.declare("orders", partitions=3)
        receipts = []
        for i in range(6):
            receipts.append(bus.publish("orders", f"order {i}", key=f"customer-{i}"))
            time.sleep(0.002)  # a millisecond timestamp of its own: the merge's order
    assert len({r.partition for r in receipts}) > 1
    assert main(["tail", url, "orders"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[-1].strip("'") for line in lines] == [str(i) for i in range(6)]
    assert main(["tail", url, "orders", "--partition", str(receipts[0].partition)]) == 0
    only = capsys.readouterr().out.splitlines()
    assert len(only) == sum(r.partition == receipts[0].partition for r in receipts)


def test_worker_command_with_a_health_port_in_use_says_so_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "jobs_app.py").write_text(APP)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "polybus.cli",
                "worker",
                "jobs_app:app",
                "--health-port",
                str(port),
            ],
            cwd=tmp_path,
            env={**os.environ, "BUS_URL": "memory://", "OUT": str(tmp_path / "out.txt")},
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert f"cannot serve health on 127.0.0.1:{port}" in proc.stderr


def test_worker_command_waits_for_a_broker_that_is_not_there_yet(tmp_path: Path) -> None:
    """Health answers 503 naming the address while the broker does not answer, and the
    worker starts its consumers once it does (the broker here: Redis behind a proxy that
    starts listening later)."""
    require_server("redis", servers.redis_unavailable())
    redis_url = urlsplit(servers.redis_url())
    port = servers.free_port()
    url = f"redis://127.0.0.1:{port}/0?connect_timeout=0.2&prefix=t{port}"
    with _worker_with_health(tmp_path, bus_url=url) as (proc, health):
        code, report = _health(health)
        assert (code, report["status"]) == (503, "unreachable")
        assert f"127.0.0.1:{port}" in report["reason"]
        host, real_port = redis_url.hostname or "127.0.0.1", redis_url.port or 6379
        with TcpProxy(host, real_port, listen_port=port):
            _wait_for(lambda: _health(health)[0] == 200, "the worker to start once Redis answers")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(DEADLINE) == 0


def test_each_failure_is_one_log_line_with_the_messages_ids_and_position_not_its_payload(
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "card 4111 1111 1111 1111"

    def decline(d: polybus.Delivery) -> None:
        raise ValueError("declined")

    policy = RetryPolicy(max_attempts=2, initial_delay=0.1, jitter=0.0)
    with polybus.connect("memory://") as bus, caplog.at_level(logging.INFO, "polybus.worker"):
        bus.declare("payments", partitions=1, groups=["billing"])
        consumer = Consumer(bus, "payments", decline, group="billing", retry=policy).start()
        sent = bus.publish("payments", Message(secret, key="k", correlation_id="order-7"))
        _wait_for(lambda: consumer.stats.dead_lettered == 1, "the dead letter", consumer)
        consumer.stop()
    lines = [r for r in caplog.records if r.name == "polybus.worker"]
    assert [(r.levelname, r.outcome, r.attempt) for r in lines] == [
        ("INFO", "retry", 1),
        ("WARNING", "dead-letter", 2),
    ]
    first, last = lines
    assert (first.topic, first.partition, first.offset) == ("payments", 0, sent.offset)
    assert last.topic == consumer.retry_topic  # where the second try was read from
    for r in lines:
        assert r.message_id == first.message_id
        assert r.correlation_id == "order-7"
        assert (r.group, r.error_type) == ("billing", "ValueError")
        assert "ValueError: declined" in r.getMessage()
        assert secret not in repr(vars(r))  # the message and every field
    assert first.getMessage().endswith("retry in 0.1 s")
    assert last.getMessage().endswith("gave up (exhausted)")


def test_metrics_are_scraped_from_the_health_port_in_prometheus_text() -> None:
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider

    from polybus.otel.metrics import Metrics

    provider = MeterProvider(metric_readers=[PrometheusMetricReader()])  # prometheus_client's
    app = App(middleware=[Metrics(provider)])
    handled: list[str] = []

    @app.consumer("orders", group="billing")
    def bill(d: polybus.Delivery) -> None:
        handled.append(d.message.value)

    try:
        with polybus.connect("memory://") as bus:
            worker = Worker(app, bus).start()
            port = worker.serve_health(0)
            bus.publish_many("orders", ["a", "b"])
            _wait_for(lambda: len(handled) == 2, "the handling")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                status, content_type = reply.status, reply.headers["Content-Type"]
                text = reply.read().decode()
            worker.stop()
    finally:
        provider.shutdown()  # takes its collector out of prometheus_client's registry
    assert status == 200
    assert content_type.startswith("text/plain; version=0.0.4")
    labels = {
        "messaging_system": "polybus",
        "messaging_destination_name": "orders",
        "messaging_consumer_group_name": "billing",
    }
    consumed = _sample(text, "messaging_client_consumed_messages_total", labels)
    durations = _sample(text, "messaging_process_duration_seconds_count", labels)
    assert (consumed, durations) == (2.0, 2.0)


def _sample(text: str, name: str, labels: dict[str, str]) -> float:
    """The value of the one sample of ``name`` in Prometheus ``text`` that has ``labels``."""
    found = []
    for line in text.splitlines():
        sample = re.fullmatch(r"(\w+)\{(.*)\} (\S+)", line)
        if sample and sample[1] == name:
            has = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', sample[2]))
            if labels.items() <= has.items():
                found.append(float(sample[3]))
    assert len(found) == 1, f"{len(found)} samples of {name} with {labels} in:\n{text}"
    return found[0]


def test_metrics_without_prometheus_client_name_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails as if missing
    with polybus.connect("memory://") as bus:
        worker = Worker(App(), bus)
        port = worker.serve_health(0)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
        worker.stop()
    assert err.value.code == 404
    assert "pip install polybus[prometheus]" in err.value.read().decode()
    err.value.close()
