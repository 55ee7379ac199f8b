"""Every exception class a client library defines maps into the polybus tree.

Each adapter module has ``map_error(exc) -> PolybusError``, applied at every
boundary (``raise map_error(exc) from exc``). These tests list the client
library's exception classes by walking its modules, so an exception class
added in a new client release fails here until it is mapped.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

from polybus import ConnectionLost, PolybusError

CLIENTS = [
    ("polybus.adapters.kafka", "confluent_kafka"),
    ("polybus.adapters.rabbitmq", "pika"),
    ("polybus.adapters.redis", "redis"),
]


def exception_classes(package: ModuleType) -> list[type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    modules = [package]
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        try:
            modules.append(importlib.import_module(info.name))
        except Exception:  # optional parts (e.g. schema registry extras) may not import
            continue
    for module in modules:
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__.startswith(package.__name__):
                found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return list(found.values())


def instance(cls: type[BaseException]) -> BaseException:
    """An instance built without calling the class's own __init__ (signatures vary)."""
    exc = cls.__new__(cls)
    BaseException.__init__(exc, "simulated failure")
    return exc


@pytest.mark.parametrize(("adapter", "client"), CLIENTS, ids=[c for _, c in CLIENTS])
def test_every_client_exception_maps_into_the_polybus_tree(adapter: str, client: str) -> None:
    map_error = importlib.import_module(adapter).map_error
    classes = exception_classes(importlib.import_module(client))
    assert len(classes) >= 5, f"found only {classes} in {client}"
    unmapped = {}
    for cls in classes:
        exc = instance(cls)
        try:
            mapped = map_error(exc)
        except Exception as failure:  # map_error itself must never fail
            unmapped[cls.__name__] = f"map_error raised {failure!r}"
            continue
        if not isinstance(mapped, PolybusError):
            unmapped[cls.__name__] = repr(mapped)
    assert not unmapped, f"{client} exceptions escape the polybus tree: {unmapped}"


@pytest.mark.parametrize(
    ("adapter", "error"),
    [
        ("polybus.adapters.rabbitmq", "pika.exceptions.AMQPConnectionError"),
        ("polybus.adapters.rabbitmq", "pika.exceptions.StreamLostError"),
        ("polybus.adapters.redis", "redis.exceptions.ConnectionError"),
        ("polybus.adapters.redis", "redis.exceptions.TimeoutError"),
    ],
)
def test_connection_failures_map_to_connection_lost(adapter: str, error: str) -> None:
    module, _, name = error.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    assert isinstance(importlib.import_module(adapter).map_error(instance(cls)), ConnectionLost)


def test_kafka_transport_errors_map_to_connection_lost() -> None:
    from confluent_kafka import KafkaError, KafkaException

    kafka = importlib.import_module("polybus.adapters.kafka")
    for code in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._MSG_TIMED_OUT):
        assert isinstance(kafka.map_error(KafkaException(KafkaError(code))), ConnectionLost)
