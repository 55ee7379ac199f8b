"""The conformance suite of the CloudEvents envelope (:mod:`polybus.cloudevents`): the
CloudEvents SDK (the ``cloudevents`` package, 2.x) reads what polybus publishes, and
polybus reads what the SDK publishes, on every backend.

The SDK's binding for the bus's wire protocol does the reading and writing: its
RabbitMQ binding on ``amqp-0-9-1``, its Kafka binding on every other protocol (polybus
names the headers as Kafka does where CloudEvents has no binding). The records are
the deliveries' raw fields (``d.record``): the headers as the backend carried them.
Without the SDK the tests are skipped.

Import these tests into a test module (``from polybus.testing.cloudevents import *``)
with the fixtures of :mod:`polybus.testing.plugin` registered.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from polybus import Delivery, Message
from polybus.cloudevents import CloudEvents, attributes
from polybus.types import InRecord, OutRecord

from .conformance import Connect, drain

__all__ = [
    "test_cloudevents_sdk_reads_what_polybus_publishes",
    "test_polybus_reads_the_cloudevents_an_sdk_publishes",
]

AMQP_0_9_1 = "amqp-0-9-1"


def _sdk_event(wire_protocol: str, record: InRecord) -> Any:
    """The SDK's event from ``record``, read by the binding of ``wire_protocol``."""
    pytest.importorskip("cloudevents.core.bindings.kafka")
    from cloudevents.core.bindings import kafka, rabbitmq

    if wire_protocol == AMQP_0_9_1:
        return rabbitmq.from_binary_event(
            rabbitmq.RabbitMQMessage(
                headers=dict(record.headers),
                content_type=record.header("content-type"),  # the content_type property
                body=record.payload or b"",
            )
        )
    return kafka.from_binary_event(
        kafka.KafkaMessage(
            headers={name: value.encode() for name, value in record.headers},
            key=record.key,
            value=record.payload or b"",
        )
    )


def _sdk_record(wire_protocol: str, event: Any) -> OutRecord:
    """``event`` as the SDK's binding of ``wire_protocol`` writes it, as a record."""
    from cloudevents.core.bindings import kafka, rabbitmq

    if wire_protocol == AMQP_0_9_1:
        amqp = rabbitmq.to_binary_event(event)
        headers = [*amqp.headers.items()]
        if amqp.content_type is not None:
            headers.append(("content-type", amqp.content_type))  # the content_type property
        return OutRecord(amqp.body, None, tuple(headers))
    message = kafka.to_binary_event(event)
    key = message.key.encode() if isinstance(message.key, str) else message.key
    headers = [(name, value.decode()) for name, value in message.headers.items()]
    return OutRecord(message.value, key, tuple(headers))


def test_cloudevents_sdk_reads_what_polybus_publishes(connect: Connect, topic: str) -> None:
    pytest.importorskip("cloudevents.core.bindings.kafka")
    bus = connect()
    bus.use(CloudEvents(source="/billing", type="com.acme.invoice.created"))
    bus.declare(topic, partitions=1, groups=["g"])
    invoice = Message(
        {"invoice": 42, "total": 9.5},
        key="invoice-42",
        headers={"ce_tenant": "acme", "note": "not an attribute"},
    )
    bus.publish_many(topic, [invoice, b"\xff\xfe raw"])
    with bus.subscribe(topic, "g") as sub:
        deliveries: list[Delivery] = drain(sub, 2)
    assert len(deliveries) == 2
    first, second = (_sdk_event(bus.wire_protocol, d.record) for d in deliveries)

    assert first.get_specversion() == "1.0"
    assert first.get_id() == invoice.id == deliveries[0].message.id
    assert first.get_source() == "/billing"
    assert first.get_type() == "com.acme.invoice.created"
    assert first.get_time() == datetime.fromtimestamp(int(invoice.timestamp * 1000) / 1000, UTC)
    assert first.get_subject() == "invoice-42"
    assert first.get_extension("tenant") == "acme"
    assert first.get_datacontenttype() == "application/json"
    assert first.get_data() == {"invoice": 42, "total": 9.5}

    assert second.get_id() == deliveries[1].message.id
    assert second.get_subject() is None  # no key
    assert second.get_datacontenttype() == "application/octet-stream"
    assert second.get_data() == b"\xff\xfe raw"
    assert deliveries[1].value == b"\xff\xfe raw"  # and polybus still reads bytes


def test_polybus_reads_the_cloudevents_an_sdk_publishes(connect: Connect, topic: str) -> None:
    pytest.importorskip("cloudevents.core.bindings.kafka")
    from cloudevents.core.v1.event import CloudEvent

    bus = connect()  # no envelope option: reading CloudEvents needs none
    bus.declare(topic, partitions=1, groups=["g"])
    sent = datetime(2026, 3, 4, 5, 6, 7, 891000, tzinfo=UTC)
    event = CloudEvent(
        {
            "type": "com.acme.order.placed",
            "source": "https://acme.example/shop",
            "subject": "order-7",
            "time": sent,
            "datacontenttype": "application/json",
            "region": "eu",
        },
        {"order": 7, "items": ["a", "b"]},
    )
    bus.publish_records(topic, [_sdk_record(bus.wire_protocol, event)])
    with bus.subscribe(topic, "g") as sub:
        (d,) = drain(sub, 1)

    message = d.message
    assert message.id == event.get_id()
    assert message.timestamp == sent.timestamp()
    assert message.content_type == "application/json"
    assert d.value == {"order": 7, "items": ["a", "b"]}
    found = attributes(d)
    assert found["specversion"] == "1.0"
    assert found["id"] == event.get_id()
    assert found["source"] == "https://acme.example/shop"
    assert found["type"] == "com.acme.order.placed"
    assert found["subject"] == "order-7"
    assert found["region"] == "eu"
    assert found["datacontenttype"] == "application/json"
    assert datetime.fromisoformat(found["time"]) == sent
