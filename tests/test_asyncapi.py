"""``asyncapi_document`` and ``polybus docs``: an App's AsyncAPI 3.0 document, checked
against the official AsyncAPI 3.0.0 JSON schema (tests/data/README.md says where it
comes from) and for what the schema cannot see: references that resolve, and channels,
operations, payloads, headers and bindings that match the registrations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from asyncapi_app import Card, Line, Order, app
from polybus.asyncapi import asyncapi_document
from polybus.envelope import (
    CONTENT_TYPE,
    CORRELATION_ID,
    DEAD_LETTER_REASON,
    DUE,
    MESSAGE_ID,
    REMOTE_ERROR_TYPE,
    REPLY_TO,
    TIMESTAMP,
)
from polybus.patterns import App

HERE = Path(__file__).parent
ASYNCAPI_3 = jsonschema.Draft7Validator(
    json.loads((HERE / "data" / "asyncapi-3.0.0.schema.json").read_text())
)
URLS = {
    "native": "native:///var/lib/shop/bus",
    "kafka": "kafka://alice:s3cret-pass@b1:9092,b2:9092?sasl.password=s3cret-opt",
    "amqp": "amqp://guest:s3cret-pass@rabbit:5672/shop",
    "redis": "redis://:s3cret-pass@cache:6379/0",
}


def resolve(document: dict[str, Any], ref: str) -> Any:
    """The part of ``document`` a local ``#/a/b`` reference points to (KeyError if none)."""
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if "$ref" in node else []
        return own + [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


@pytest.mark.parametrize("backend", sorted(URLS))
def test_the_document_is_valid_asyncapi_3_and_its_references_resolve(backend: str) -> None:
    document = asyncapi_document(app, URLS[backend], title="shop")
    errors = [
        f"{list(e.absolute_path)}: {e.message[:300]}" for e in ASYNCAPI_3.iter_errors(document)
    ]
    assert not errors, "\n".join(errors)
    for ref in refs(document):
        assert ref.startswith("#/"), ref
        resolve(document, ref)
    for name, operation in document["operations"].items():  # its messages are its channel's
        channel = operation["channel"]["$ref"]
        assert all(m["$ref"].startswith(f"{channel}/messages/") for m in operation["messages"]), (
            name
        )


def test_channels_and_operations_follow_the_registrations() -> None:
    document = asyncapi_document(app)
    assert set(document["channels"]) == {
        "orders",
        "orders.billing.retry",  # billing retries; audit is at-most-once: it never does
        "orders.billing.dlq",
        "orders.audit.dlq",
        "prices",  # a responder: no retries, no dead letters
        "prices.replies",
    }
    assert sorted(document["channels"]["orders"]["messages"]) == ["Order", "any-value"]
    actions = {name: op["action"] for name, op in document["operations"].items()}
    assert actions == {
        "orders.billing.receive": "receive",
        "orders.billing.retry.send": "send",
        "orders.billing.retry.receive": "receive",
        "orders.billing.dlq.send": "send",
        "orders.audit.receive": "receive",
        "orders.audit.dlq.send": "send",
        "prices.responders.receive": "receive",
    }
    bill = document["operations"]["orders.billing.receive"]
    assert bill["summary"] == "Charge the order's payment."
    assert "`bill` in group `billing`" in bill["description"]
    answer = document["operations"]["prices.responders.receive"]
    assert answer["summary"] == "The price of a SKU, in cents."
    assert answer["reply"]["channel"] == {"$ref": "#/channels/prices.replies"}
    assert document["info"]["title"] == "polybus app"
    assert document["servers"] == {
        "native": {"host": "localhost", "protocol": "native", "pathname": "/var/lib/shop/bus"}
    }
    assert "servers" not in asyncapi_document(App(), title="no bus")


def test_a_typed_handlers_payload_is_its_pydantic_models_schema() -> None:
    document = asyncapi_document(app)
    payload = resolve(document, "#/components/messages/Order")["payload"]
    # pydantic writes JSON Schema 2020-12; the document holds what its references reach
    check = jsonschema.Draft202012Validator({**payload, "components": document["components"]})
    order = Order(id=7, lines=[Line(sku="a", quantity=2)], payment=Card(last4="4242"))
    check.validate(order.model_dump(mode="json"))
    assert not check.is_valid({"id": 7, "lines": [{"sku": "a", "quantity": 0}], "payment": {}})
    for typed in ("Order.retry", "Order.dead-letter"):
        assert document["components"]["messages"][typed]["payload"] == payload
    assert document["components"]["messages"]["any-value"]["payload"]["description"]


def test_headers_list_the_envelope_and_the_patterns_own() -> None:
    document = asyncapi_document(app)

    def headers(message: str) -> set[str]:
        schema = resolve(document, f"#/components/messages/{message}")["headers"]
        return set(resolve(document, schema["$ref"])["properties"])

    envelope = {MESSAGE_ID, TIMESTAMP, CONTENT_TYPE, CORRELATION_ID}
    assert envelope <= headers("Order")
    assert DUE not in headers("Order")
    assert envelope | {DUE} <= headers("Order.retry")
    assert envelope | {DEAD_LETTER_REASON} <= headers("Order.dead-letter")
    assert envelope | {REPLY_TO} <= headers("any-value.request")
    assert envelope | {REMOTE_ERROR_TYPE} <= headers("any-value.reply")


def test_bindings_are_the_backends() -> None:
    kafka = asyncapi_document(app, URLS["kafka"])
    bill = kafka["operations"]["orders.billing.receive"]["bindings"]["kafka"]
    assert bill["groupId"] == {"type": "string", "enum": ["billing"]}
    assert kafka["channels"]["orders"]["bindings"]["kafka"]["topic"] == "orders"
    assert kafka["channels"]["orders.billing.dlq"]["bindings"]["kafka"]["partitions"] == 1

    amqp = asyncapi_document(app, URLS["amqp"])
    exchange = amqp["channels"]["orders"]["bindings"]["amqp"]["exchange"]
    assert exchange == {
        "name": "orders",
        "type": "fanout",
        "durable": True,
        "autoDelete": False,
        "vhost": "shop",
    }
    assert "queue `orders/billing`" in amqp["operations"]["orders.billing.receive"]["description"]

    for backend in ("redis", "native"):  # AsyncAPI has no binding for them
        assert '"bindings"' not in json.dumps(asyncapi_document(app, URLS[backend]))


@pytest.mark.parametrize("backend", sorted(URLS))
def test_servers_show_hosts_and_never_secrets(backend: str) -> None:
    document = asyncapi_document(app, URLS[backend])
    assert "s3cret" not in json.dumps(document)
    (server,) = document["servers"].values()
    assert (
        server["host"]
        == {
            "native": "localhost",
            "kafka": "b1:9092,b2:9092",
            "amqp": "rabbit:5672",
            "redis": "cache:6379",
        }[backend]
    )


def test_the_caller_owns_the_document() -> None:
    before = json.dumps(asyncapi_document(app))
    changed = asyncapi_document(app)
    changed["components"]["schemas"]["polybus-message-headers"]["properties"][MESSAGE_ID]["x"] = 1
    changed["components"]["messages"]["any-value"]["payload"]["x"] = 1
    assert json.dumps(asyncapi_document(app)) == before


def docs(*args: str) -> subprocess.CompletedProcess[str]:
    """``polybus docs ...`` run where asyncapi_app.py is."""
    return subprocess.run(
        [sys.executable, "-m", "polybus.cli", "docs", *args],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_docs_command_prints_a_valid_document(tmp_path: Path) -> None:
    done = docs("asyncapi_app:app", "--url", URLS["kafka"])
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert not list(ASYNCAPI_3.iter_errors(document))
    assert document["info"]["title"] == "asyncapi_app:app"
    assert document["servers"]["kafka"]["host"] == "b1:9092,b2:9092"

    written = tmp_path / "asyncapi.json"
    assert docs("asyncapi_app", "--output", str(written)).returncode == 0  # attribute: app
    assert json.loads(written.read_text())["servers"]["native"]["protocol"] == "native"


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("no_such_module:app", "cannot load 'no_such_module:app': No module named"),
        ("asyncapi_app:no_such_app", "cannot load 'asyncapi_app:no_such_app'"),
        ("asyncapi_app:Order", "'asyncapi_app:Order' is a ModelMetaclass, not a polybus App"),
    ],
)
def test_docs_command_explains_a_bad_app_path(spec: str, says: str) -> None:
    done = docs(spec)
    assert done.returncode == 1
    assert says in done.stderr
    assert not done.stdout
    if "cannot load" in says:
        assert "module:attribute" in done.stderr  # what to give instead
