"""``polybus stats`` and ``polybus top`` from the shell: their output, a broker that is
down, and URLs with secrets. What each backend reports is in the conformance suite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import polybus
from polybus.cli import main
from polybus.testing import servers
from polybus.testing.plugin import require_server

DEADLINE = 20.0


def _orders(url: str) -> None:
    """Topic orders: 10 messages over 2 partitions; billing acked 4, audit none."""
    with polybus.connect(url) as bus:
        bus.declare("orders", partitions=2, groups=["billing", "audit"])
        bus.publish_many("orders", list(range(10)))
        with bus.subscribe("orders", "billing") as sub:
            acked = 0
            end = time.monotonic() + DEADLINE
            while acked < 4 and time.monotonic() < end:
                batch = sub.fetch(4 - acked, timeout=0.5)
                sub.ack(batch)
                acked += len(batch)
    assert acked == 4


def _top(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "polybus.cli", "top", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


def test_stats_prints_offsets_and_lag_as_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"native://{tmp_path}"
    _orders(url)
    assert main(["stats", url]) == 0
    out = json.loads(capsys.readouterr().out)
    orders = out["topics"]["orders"]
    assert out["complete"] is True
    assert orders["end_offset"] == 10
    assert [p["partition"] for p in orders["partitions"]] == [0, 1]
    assert sum(p["end_offset"] - p["start_offset"] for p in orders["partitions"]) == 10
    assert {name: group["lag"] for name, group in orders["groups"].items()} == {
        "audit": 10,
        "billing": 6,
    }
    assert sum(orders["groups"]["billing"]["partitions"]) == 6

    assert main(["stats", url, "--topic", "orders", "--group", "audit"]) == 0
    assert list(json.loads(capsys.readouterr().out)["topics"]["orders"]["groups"]) == ["audit"]
    assert main(["stats", url, "--topic", "nothing-here"]) == 0
    assert json.loads(capsys.readouterr().out)["topics"] == {}


def test_stats_refuses_what_it_would_see_nothing_at_or_create(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["stats", "memory://"]) == 1
    assert "process of its own" in capsys.readouterr().err
    assert main(["top", f"native://{tmp_path / 'none'}", "--once"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_top_shows_each_topics_rate_while_messages_arrive(tmp_path: Path) -> None:
    url = f"native://{tmp_path}"
    _orders(url)
    top = _top(url, "--iterations", "3", "--interval", "0.3")
    with polybus.connect(url) as bus:  # publishes until top has printed its last frame
        end = time.monotonic() + DEADLINE
        while top.poll() is None and time.monotonic() < end:
            bus.publish("orders", "more")
    out, err = top.communicate(timeout=DEADLINE)
    assert top.returncode == 0, err
    rows = [line.split() for line in out.splitlines() if line.startswith("orders ")]
    assert len(rows) == 3
    assert rows[0][3] == "-"  # the first frame has nothing to compare with
    assert float(rows[-1][3]) > 0  # msg/s, from the end offsets of the last two frames
    assert "  billing" in out
    assert "  audit" in out


def test_top_leaves_on_ctrl_c_with_status_0(tmp_path: Path) -> None:
    url = f"native://{tmp_path}"
    _orders(url)
    top = _top(url, "--interval", "0.2")
    assert top.stdout is not None
    assert top.stdout.readline().startswith("polybus top ")  # the first frame is out
    top.send_signal(signal.SIGINT)
    _, err = top.communicate(timeout=DEADLINE)
    assert top.returncode == 0
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("command", "url", "broker", "start"),
    [
        ("stats", "redis://:hunter2@127.0.0.1:1/0", "Redis", "redis-server"),
        ("top", "amqp://guest:hunter2@127.0.0.1:1/", "RabbitMQ", "rabbitmq-server"),
        ("stats", "kafka://user:hunter2@127.0.0.1:1", "Kafka", "apache/kafka"),
    ],
)
def test_a_broker_that_is_down_is_named_with_how_to_start_it(
    command: str,
    url: str,
    broker: str,
    start: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    started = time.monotonic()
    assert main([command, url, "--once"] if command == "top" else [command, url]) == 1
    assert time.monotonic() - started < 5
    out, err = capsys.readouterr()
    assert f"no {broker}" in err
    assert "127.0.0.1:1" in err
    assert start in err
    assert "hunter2" not in out + err


def test_no_secret_of_the_url_is_shown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stats", f"native://{tmp_path}?token=hunter2"]) == 1
    assert main(["top", f"native://{tmp_path}?token=hunter2", "--once"]) == 1
    err = capsys.readouterr().err
    assert "token=***" in err
    assert "hunter2" not in err

    require_server("RabbitMQ", servers.rabbitmq_unavailable())
    url = servers.rabbitmq_url()
    password = url.split("@")[0].rpartition(":")[2]
    topic = f"cli-{uuid.uuid4().hex[:8]}"
    with polybus.connect(url) as bus:
        bus.declare(topic, groups=["billing"])
    try:
        assert main(["top", url, "--topic", topic, "--once"]) == 0
        out, err = capsys.readouterr()
        assert f":{password}@" not in out + err
        assert ":***@" in out.splitlines()[0]
        assert "name them with --topic and --group" in out  # AMQP lists no queues
        assert main(["stats", url, "--topic", topic, "--group", "billing"]) == 0
        out, err = capsys.readouterr()
        assert json.loads(out)["topics"][topic]["groups"] == {
            "billing": {"lag": 0, "partitions": [0]}
        }
        assert err == ""
    finally:
        servers.rabbitmq_delete_topic(topic, ("billing",))
