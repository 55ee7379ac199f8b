"""The parts above the adapters: URLs, codecs, the envelope, errors for bad input."""

from __future__ import annotations

import re
import socket
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest
from pydantic import BaseModel

import polybus
from polybus import BackendUnavailable, ConfigurationError, DecodeError, EncodeError, Message
from polybus.adapters.base import Capability
from polybus.adapters.native import NativeBackend
from polybus.cloudevents import CloudEvents
from polybus.codecs import JSON, MSGPACK, decoder_for, encode
from polybus.envelope import MESSAGE_ID, TIMESTAMP
from polybus.errors import BrokerUnreachable, ConnectionLost
from polybus.message import message_of, uuid7, uuid7s
from polybus.patterns.retry import failure_headers
from polybus.testing import servers
from polybus.types import InRecord, OutRecord, Receipt, ValueBatch


def test_uuid7_is_version_7_and_sorts_in_creation_order() -> None:
    ids = [uuid7() for _ in range(5000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    parsed = uuid.UUID(ids[0])
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
    assert abs((parsed.int >> 80) / 1000 - time.time()) < 5


def test_uuid7_batches_sort_with_single_ids_past_a_spent_counter() -> None:
    # 4,097 ids in a batch spend the 12-bit counter of a millisecond: the rest borrow the next
    ids = [*uuid7s(3), uuid7(), *uuid7s(4097), uuid7(), *uuid7s(1), *uuid7s(0)]
    assert len(ids) == 4103
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(str(uuid.UUID(i)) == i and uuid.UUID(i).version == 7 for i in ids)
    assert len({i[20:] for i in ids}) == len(ids)  # 60 random bits each, not one draw for all


def test_a_value_batch_is_the_sequence_of_its_records() -> None:
    ids = uuid7s(3)
    batch = ValueBatch([b"a", b"b", b"c"], "polybus-id", ids, ("polybus-timestamp", "7"), 7)
    expected = [
        OutRecord(v, None, (("polybus-id", i), ("polybus-timestamp", "7")), 7, 0)
        for v, i in zip([b"a", b"b", b"c"], ids, strict=True)
    ]
    assert len(batch) == 3
    assert bool(batch)
    assert list(batch) == expected
    assert batch[1] == expected[1]
    assert batch[-1] == expected[2]
    assert batch[1:] == expected[1:]
    assert list(reversed(batch)) == expected[::-1]
    assert expected[2] in batch
    assert batch.index(expected[2]) == 2
    assert next(zip(*batch, strict=True)) == (b"a", b"b", b"c")
    assert not ValueBatch([], "polybus-id", [], ("polybus-timestamp", "7"), 7)
    with pytest.raises(ValueError, match="2 values but 1 ids"):
        ValueBatch([b"a", b"b"], "polybus-id", ids[:1], ("polybus-timestamp", "7"), 7)


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("nats://localhost", "unknown URL scheme 'nats'"),
        ("localhost:9092", "expected scheme://"),
        ("native://", "names no directory"),
        ("native:///tmp/x?fsync=sometimes", "fsync must be one of"),
        ("native:///tmp/x?colour=blue", "unknown option"),
    ],
)
def test_bad_urls_name_the_problem(url: str, needle: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(needle)):
        polybus.connect(url)


@pytest.mark.parametrize(
    ("scheme", "client", "extra"),
    [
        ("kafka", "confluent_kafka", "kafka"),
        ("amqp", "pika", "rabbitmq"),
        ("redis", "redis", "redis"),
    ],
)
def test_a_missing_client_library_names_the_extra_to_install(
    scheme: str, client: str, extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, client, None)  # makes `import client` fail
    with pytest.raises(BackendUnavailable, match=re.escape(f"pip install 'polybus[{extra}]'")):
        polybus.connect(f"{scheme}://localhost")


def test_codecs_round_trip_and_refuse_what_they_cannot_encode() -> None:
    for value, content_type in [
        (b"\x00\x01", None),
        ("héllo", None),
        ({"a": [1, 2.5, None, True]}, None),
        ({"a": 1}, MSGPACK),
    ]:
        payload, ct = encode(value, content_type)
        assert decoder_for(ct)(payload) == value
    with pytest.raises(EncodeError, match="set"):
        encode({1, 2})
    for not_json in (float("nan"), float("inf"), -float("inf")):  # json.dumps would write NaN
        with pytest.raises(EncodeError, match="JSON compliant"):
            encode({"x": [not_json]})
    with pytest.raises(EncodeError, match="no codec"):
        encode(object(), "application/x-custom")
    with pytest.raises(DecodeError, match="not valid application/json"):
        decoder_for(JSON)(b"{not json")


class Order(BaseModel):
    id: int
    items: list[str]


def test_pydantic_models_encode_as_json_and_decode_into_the_model(tmp_path: Path) -> None:
    with polybus.connect(f"native://{tmp_path}") as bus:
        bus.publish("orders", Order(id=7, items=["pen"]), key="c1")
        bus.publish("orders", {"id": "not-an-int", "items": []}, key="c1")
        with bus.subscribe("orders", "g", model=Order) as sub:
            good, bad = sub.fetch(2, timeout=5)
            assert good.value == Order(id=7, items=["pen"])
            assert good.message.value == Order(id=7, items=["pen"])
            with pytest.raises(DecodeError, match="does not match Order"):
                _ = bad.value
            with pytest.raises(DecodeError, match="does not match Order"):
                _ = bad.message.value


def test_bad_input_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    with polybus.connect(f"native://{tmp_path}") as bus:
        bus.declare("t", partitions=1)
        with pytest.raises(ConfigurationError, match="header 'n' must map str to str"):
            bus.publish("t", "x", headers={"n": 1})  # type: ignore[dict-item]
        with pytest.raises(ConfigurationError, match="key must be str, bytes or None"):
            bus.publish("t", "x", key=42)  # type: ignore[arg-type]
        with pytest.raises(EncodeError):
            bus.publish_many("t", ["fine", {1, 2}])
        with pytest.raises(EncodeError):
            bus.publish_many("t", ["fine", {"x": float("nan")}])
        with pytest.raises(ConfigurationError, match="invalid topic name"):
            bus.publish("../etc", "x")
        with pytest.raises(ConfigurationError, match="exists with 1 partitions"):
            bus.declare("t", partitions=3)
        with bus.subscribe("t", "g") as sub:
            assert sub.fetch(10, timeout=0.2) == []


def test_an_engine_record_is_a_delivery_that_decodes_but_settles_through_its_consumer(
    tmp_path: Path,
) -> None:
    from polybus.log import Log

    with polybus.connect(f"native://{tmp_path}") as bus:
        bus.declare("t", partitions=1, groups=["g"])
        bus.publish("t", {"n": 1}, key="k")
    with Log(tmp_path) as log, log.consumer("t", "g") as consumer:
        (record,) = consumer.poll(10, timeout=5)
        assert isinstance(record, polybus.Delivery)
        assert record.payload == b'{"n":1}'
        assert (record.value, record.message.key, record.attempt) == ({"n": 1}, "k", 1)
        with pytest.raises(ConfigurationError, match=r"Consumer\.ack"):
            record.ack()
        consumer.ack([record])


def test_message_reply_links_correlation_and_causation() -> None:
    request = Message({"q": 1})
    reply = request.reply({"a": 2})
    assert reply.correlation_id == request.id
    assert reply.causation_id == request.id
    assert reply.id != request.id


def test_patterns_are_configurations_of_topics_and_groups(tmp_path: Path) -> None:
    from polybus.patterns import fanout, pubsub, work_queue

    with polybus.connect(f"native://{tmp_path}") as bus:
        fanout(bus, "events", ["audit", "search"])
        with pubsub(bus, "events") as live:
            bus.publish("events", "e1")
            assert [d.message.value for d in live.fetch(5, timeout=5)] == ["e1"]
        for group in ("audit", "search"):
            with work_queue(bus, "events", group) as worker:
                assert [d.message.value for d in worker.fetch(5, timeout=5)] == ["e1"]


def test_cli_lists_topics_groups_and_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from polybus.cli import main

    url = f"native://{tmp_path}"
    with polybus.connect(url) as bus:
        bus.declare("orders", partitions=2, groups=["pay"])
        bus.publish_many("orders", [Message({"i": i}, key=f"k{i}") for i in range(5)])
    assert main(["topics", url]) == 0
    assert main(["groups", url, "orders"]) == 0
    assert main(["tail", url, "orders", "--partition", "0", "-n", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    ends = [int(line.split()[3]) for line in out if line.startswith("orders")]
    assert sum(ends) == 5
    lags = [int(line.split()[2]) for line in out if line.startswith("pay")]
    assert sum(lags) == 5
    assert out[-1].startswith("0:0 ")
    assert main(["topics", "nats://x"]) == 1
    assert "unknown URL scheme" in capsys.readouterr().err


def test_memory_is_one_store_per_process_unless_named() -> None:
    with polybus.connect("memory://") as a, polybus.connect("memory://") as b:
        a.declare("shared", groups=["g"])
        a.publish("shared", "seen by b")
        with b.subscribe("shared", "g") as sub:
            assert [d.value for d in sub.fetch(10, timeout=5)] == ["seen by b"]
        assert Capability.MULTI_PROCESS not in a.capabilities
    with polybus.connect("memory://") as a, polybus.connect("memory://other") as c:
        a.declare("mine")
        assert isinstance(a.backend, NativeBackend)
        assert isinstance(c.backend, NativeBackend)
        assert "mine" in a.backend.log.topics()
        assert "mine" not in c.backend.log.topics()


def test_a_native_url_with_a_host_part_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigurationError, match=r"native:///tmp/x"):
        polybus.connect("native://tmp/x")


@pytest.mark.parametrize(
    "url",
    [
        "kafka://127.0.0.1:{port}",
        "redis://127.0.0.1:{port}/0",
        "amqp://guest:guest@127.0.0.1:{port}/%2F",
        "redis://no-such-host.invalid:6379/0",
    ],
)
def test_a_broker_that_is_not_there_is_named_within_seconds(url: str) -> None:
    url = url.format(port=servers.free_port())  # nothing listens there
    started = time.monotonic()
    with pytest.raises(BrokerUnreachable, match="is it running") as raised:
        polybus.connect(f"{url}{'&' if '?' in url else '?'}connect_timeout=0.5")
    assert time.monotonic() - started < 3
    host_port = url.split("@")[-1].split("//")[-1].split("/")[0]
    assert host_port in str(raised.value)
    assert not isinstance(raised.value, ConnectionLost)  # there was no connection to lose


def test_a_rabbitmq_that_accepts_but_never_answers_is_named_within_seconds() -> None:
    with socket.socket() as silent:  # the kernel accepts connections; nobody speaks AMQP
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(
            BrokerUnreachable, match="overloaded, stuck or out of file handles"
        ) as raised:
            polybus.connect(f"amqp://guest:pw@127.0.0.1:{port}/%2F?connect_timeout=0.5")
    assert time.monotonic() - started < 8
    assert f"127.0.0.1:{port}" in str(raised.value)
    assert "pw" not in str(raised.value)


def test_connect_timeout_must_be_seconds() -> None:
    with pytest.raises(ConfigurationError, match="connect_timeout must be a positive number"):
        polybus.connect("redis://127.0.0.1:6379/0?connect_timeout=soon")


# -- CloudEvents (polybus.cloudevents; the SDK's side is in polybus.testing.cloudevents) --


def _record(*headers: tuple[str, str], key: bytes | None = None) -> InRecord:
    return InRecord("t", 0, 7, b"{}", key, headers, 1_000)


@pytest.mark.parametrize(
    ("prefix", "sent", "epoch_ms"),
    [
        ("ce_", "2026-03-04T05:06:07.891Z", 1772600767891),
        ("ce-", "2026-03-04t05:06:07.891z", 1772600767891),  # RFC 3339 allows t and z
        ("cloudEvents:", "2026-03-04T07:06:07.891+02:00", 1772600767891),
        ("cloudEvents_", "2026-03-04T05:06:07.891234567Z", 1772600767891),
        ("ce_", "2026-03-04T05:06:07.891", 1772600767891),  # no offset: taken as UTC
        ("ce_", "last tuesday", 1_000),  # not RFC 3339: the backend's timestamp
        ("ce_", None, 1_000),
    ],
)
def test_a_cloudevent_without_polybus_envelope_is_read_with_its_id_and_time(
    prefix: str, sent: str | None, epoch_ms: int
) -> None:
    headers = [(f"{prefix}id", "event-1"), ("content-type", "application/json")]
    if sent is not None:
        headers.append((f"{prefix}time", sent))
    message = message_of(_record(*headers))
    assert (message.id, round(message.timestamp * 1000)) == ("event-1", epoch_ms)
    assert message.content_type == "application/json"
    assert message.headers[f"{prefix}id"] == "event-1"  # the attributes stay visible


def test_polybus_envelope_wins_over_cloudevent_attributes() -> None:
    record = _record((MESSAGE_ID, "m-1"), (TIMESTAMP, "2000"), ("ce_id", "e-1"))
    message = message_of(record)
    assert (message.id, message.timestamp) == ("m-1", 2.0)
    assert message_of(_record(("x", "y"))).id == "t/0/7"  # neither: the position


def test_a_retried_cloudevent_keeps_its_id() -> None:
    headers = dict(failure_headers(_record(("ce_id", "e-1")), ValueError("no"), 5))
    assert headers[MESSAGE_ID] == "e-1"
    assert dict(failure_headers(_record(), ValueError("no"), 5))[MESSAGE_ID] == "t/0/7"


def _published(bus: polybus.Bus, topic: str) -> list[dict[str, str]]:
    with bus.subscribe(topic, "g", start="earliest") as sub:
        return [dict(d.headers) for d in sub.fetch(100, timeout=5)]


def test_cloudevents_envelope_completes_what_a_message_gives() -> None:
    bus = polybus.connect(
        f"memory://{uuid.uuid4().hex}", middleware=[CloudEvents(source="/billing")]
    )
    bus.declare("invoice.created", partitions=1)
    plain = Message("x", key="invoice-1")
    given = Message(
        1,
        headers={
            "ce-type": "com.acme.invoice.voided",  # any binding's prefix is taken
            "cloudEvents:subject": "invoice-2",
            "ce_source": "/other",
            "ce_id": "not this one",  # polybus's envelope has the id
            "ce_tenant": "acme",
        },
    )
    bus.publish_many("invoice.created", [plain, given, Message(b"\x01", key=b"\x02")])
    raw = OutRecord(b"{}", None, (("ce_id", "e-1"), ("ce_time", "2026-03-04T05:06:07.891Z")))
    bus.publish_records("invoice.created", [raw])
    with pytest.raises(ConfigurationError, match="lowercase letters and digits"):
        bus.publish("invoice.created", 1, headers={"ce_Tenant": "acme"})

    first, second, binary, record = _published(bus, "invoice.created")
    assert first["ce_specversion"] == "1.0"
    assert first["ce_id"] == plain.id
    assert first["ce_time"] == time.strftime(
        f"%Y-%m-%dT%H:%M:%S.{int(plain.timestamp * 1000) % 1000:03d}Z",
        time.gmtime(plain.timestamp),
    )
    assert (first["ce_source"], first["ce_type"]) == ("/billing", "invoice.created")
    assert first["ce_subject"] == "invoice-1"  # the key
    assert {k: v for k, v in second.items() if k.startswith("ce")} == {
        "ce_specversion": "1.0",
        "ce_id": given.id,
        "ce_source": "/other",
        "ce_type": "com.acme.invoice.voided",
        "ce_time": second["ce_time"],
        "ce_subject": "invoice-2",
        "ce_tenant": "acme",
    }
    assert "ce_subject" not in binary  # a binary key is no subject
    assert binary["content-type"] == "application/octet-stream"
    assert (record["ce_id"], record["ce_time"]) == ("e-1", "2026-03-04T05:06:07.891Z")
    assert record["content-type"] == "application/octet-stream"
    bus.close()


class _Bus:
    capabilities = Capability.NONE

    def __init__(self, wire_protocol: str) -> None:
        self.wire_protocol = wire_protocol


def _stamped(envelope: CloudEvents) -> dict[str, str]:
    sent: list[OutRecord] = []

    def call_next(topic: str, records: Sequence[OutRecord]) -> list[Receipt]:
        sent.extend(records)
        return []

    envelope.publish("t", [OutRecord(b"x", b"k", (("content-type", "text/plain"),))], call_next)
    return dict(sent[0].headers)


def test_cloudevents_header_names_follow_the_buss_wire_protocol() -> None:
    envelope = CloudEvents(source="/s", type="com.acme.thing")
    with pytest.raises(ConfigurationError, match="add CloudEvents to a bus"):
        _stamped(envelope)
    envelope.attach(_Bus("amqp-0-9-1"))
    envelope.attach(_Bus("amqp-0-9-1"))  # another bus of the same binding
    headers = _stamped(envelope)
    assert (headers["ce-type"], headers["ce-subject"]) == ("com.acme.thing", "k")
    assert not any(name.startswith("ce_") for name in headers)
    with pytest.raises(ConfigurationError, match="give each bus its own"):
        envelope.attach(_Bus("kafka"))

    for protocol in ("kafka", "redis", "native", "somebody-elses"):
        other = CloudEvents(source="/s")
        other.attach(_Bus(protocol))
        assert _stamped(other)["ce_type"] == "t"
    amqp10 = CloudEvents(source="/s", prefix="cloudEvents:")
    amqp10.attach(_Bus("amqp-0-9-1"))
    amqp10.attach(_Bus("kafka"))
    assert _stamped(amqp10)["cloudEvents:source"] == "/s"
    with pytest.raises(ConfigurationError, match="needs a source"):
        CloudEvents(source="")
