"""An :class:`~polybus.patterns.App` as an AsyncAPI 3.0 document (``polybus docs module:app``).

The document is built from the app's registrations alone, without connecting to
anything: a channel per topic the handlers read, and per retry, dead-letter and
reply topic they write; an operation per thing the app does with a channel
(receive, send, answer a request); and the messages, their payload schemas taken
from the registrations' pydantic models, their headers from polybus's envelope.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any
from urllib.parse import unquote, urlsplit

from .codecs import JSON
from .envelope import (
    ATTEMPT,
    ATTEMPTS,
    CAUSATION_ID,
    CONTENT_TYPE,
    CORRELATION_ID,
    DEAD_LETTER_GROUP,
    DEAD_LETTER_REASON,
    DUE,
    ERROR,
    ERROR_TYPE,
    FAILURE_HEADERS,
    FIRST_FAILURE,
    KEY_BINARY,
    LAST_FAILURE,
    MESSAGE_ID,
    ORIGIN_OFFSET,
    ORIGIN_PARTITION,
    ORIGIN_TOPIC,
    REMOTE_ERROR,
    REMOTE_ERROR_TYPE,
    REPLY_TO,
    REQUESTER,
    TIMESTAMP,
    TRACEPARENT,
    TRACESTATE,
    USER_CONTEXT,
)
from .patterns import NO_RETRY, App, Consumer
from .patterns.dlq import dead_letter_topic
from .patterns.retry import retry_topic

__all__ = ["asyncapi_document"]

_KAFKA_BINDING = "0.5.0"  # the newest binding versions the AsyncAPI 3.0.0 schema knows
_AMQP_BINDING = "0.3.0"
#: a registration's options default to Consumer's
_CONSUMER_DEFAULTS = {n: p.default for n, p in inspect.signature(Consumer).parameters.items()}
#: the payload name of a registration without a model: no pydantic model is named so (a hyphen)
_ANY_VALUE = "any-value"
_ANY_PAYLOAD = {
    "description": "Any value, encoded as its content-type header says: UTF-8 text, JSON, "
    "msgpack, or raw bytes when the header is absent."
}


def _header(description: str, **schema: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **schema}


def _epoch_ms(description: str) -> dict[str, Any]:
    return _header(f"{description}, in epoch milliseconds.", pattern="^[0-9]+$")


#: every header polybus may write, with what it holds (the names are in polybus.envelope)
_HEADERS = {
    MESSAGE_ID: _header("The message's id (a UUIDv7), kept by its retried and dead copies."),
    TIMESTAMP: _epoch_ms("When it was published"),
    CONTENT_TYPE: _header("How the payload is encoded; absent: raw bytes."),
    CORRELATION_ID: _header("The id shared by the messages of one conversation."),
    CAUSATION_ID: _header("The id of the message that caused this one."),
    TRACEPARENT: _header("W3C trace context."),
    TRACESTATE: _header("W3C trace context."),
    KEY_BINARY: _header("Present when the key was given as bytes.", enum=["1"]),
    ATTEMPT: _header("The try this copy is (absent: the first).", pattern="^[0-9]+$"),
    USER_CONTEXT: _header("The sender's signed user context (a JWT bound to the message id)."),
    DUE: _epoch_ms("When this retry is due"),
    ORIGIN_TOPIC: _header("The topic the message first arrived on."),
    ORIGIN_PARTITION: _header("Its partition there.", pattern="^[0-9]+$"),
    ORIGIN_OFFSET: _header("Its offset there."),
    ERROR_TYPE: _header("The type of the exception of the last failure."),
    ERROR: _header("The text of that exception."),
    FIRST_FAILURE: _epoch_ms("When the first try failed"),
    LAST_FAILURE: _epoch_ms("When the last try failed"),
    DEAD_LETTER_GROUP: _header("The group that gave up on the message."),
    DEAD_LETTER_REASON: _header(
        "Why: its last try failed, retrying could not help, or it could not be decoded.",
        enum=["exhausted", "not-retryable", "undecodable"],
    ),
    ATTEMPTS: _header("How many tries it had.", pattern="^[0-9]+$"),
    REPLY_TO: _header("The topic the reply goes to."),
    REQUESTER: _header("The requester that waits for the reply."),
    REMOTE_ERROR_TYPE: _header("Present when the responder raised: the exception's type."),
    REMOTE_ERROR: _header("The text of that exception."),
}
_ENVELOPE = (
    MESSAGE_ID,
    TIMESTAMP,
    CONTENT_TYPE,
    CORRELATION_ID,
    CAUSATION_ID,
    TRACEPARENT,
    TRACESTATE,
    KEY_BINARY,
    ATTEMPT,
    USER_CONTEXT,
)
#: kind of message -> (suffix of its message id, its summary, its headers beyond the envelope)
_KINDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "message": ("", "", ()),
    "retry": (
        ".retry",
        "A failed message, published again for its next try.",
        (DUE, *FAILURE_HEADERS),
    ),
    "dead-letter": (
        ".dead-letter",
        "A message its group gave up on, with its payload byte for byte (so one that "
        "could not be decoded does not match the payload schema).",
        (*FAILURE_HEADERS, DEAD_LETTER_GROUP, DEAD_LETTER_REASON, ATTEMPTS),
    ),
    "request": (
        ".request",
        f"A request: the reply goes to the topic its {REPLY_TO} header names.",
        (REPLY_TO, REQUESTER),
    ),
    "reply": (
        ".reply",
        f"The responder's return value; with {REMOTE_ERROR_TYPE}, the exception it raised.",
        (REQUESTER, REMOTE_ERROR_TYPE, REMOTE_ERROR),
    ),
}


def _ref(*path: str) -> dict[str, str]:
    return {"$ref": "#/" + "/".join(path)}


class _Bindings:
    """What a backend adds to channels and operations: nothing here. Redis has no
    AsyncAPI binding, nor have the native log and memory."""

    def channel(self, topic: str, partitions: int | None) -> dict[str, Any]:
        return {}

    def receive(self, topic: str, group: str) -> dict[str, Any]:
        return {}

    def reader(self, topic: str, group: str) -> str:
        """How the operation's description names the group reading ``topic``."""
        return f"group `{group}`"


class _KafkaBindings(_Bindings):
    def channel(self, topic: str, partitions: int | None) -> dict[str, Any]:
        binding: dict[str, Any] = {"topic": topic, "bindingVersion": _KAFKA_BINDING}
        if partitions is not None:
            binding["partitions"] = partitions
        return {"kafka": binding}

    def receive(self, topic: str, group: str) -> dict[str, Any]:
        group_id = {"type": "string", "enum": [group]}
        return {"kafka": {"groupId": group_id, "bindingVersion": _KAFKA_BINDING}}

    def reader(self, topic: str, group: str) -> str:
        return f"consumer group `{group}`"


class _AmqpBindings(_Bindings):
    """A topic is a durable exchange its groups' queues are bound to (the RabbitMQ
    adapter's docstring says how): the channel names the exchange, the description
    of a receive operation the queue."""

    def __init__(self, vhost: str) -> None:
        from .adapters.rabbitmq.names import EXCHANGE_TYPE, queue_name

        self.vhost, self.exchange_type, self.queue_name = vhost, EXCHANGE_TYPE, queue_name

    def channel(self, topic: str, partitions: int | None) -> dict[str, Any]:
        exchange = {
            "name": topic,
            "type": self.exchange_type,
            "durable": True,
            "autoDelete": False,
            "vhost": self.vhost,
        }
        return {"amqp": {"is": "routingKey", "exchange": exchange, "bindingVersion": _AMQP_BINDING}}

    def receive(self, topic: str, group: str) -> dict[str, Any]:
        return {"amqp": {"ack": True, "bindingVersion": _AMQP_BINDING}}

    def reader(self, topic: str, group: str) -> str:
        return f"group `{group}` (queue `{self.queue_name(topic, group)}`)"


def _bindings(url: str | None) -> _Bindings:
    parts = urlsplit(url or "")
    if parts.scheme == "kafka":
        return _KafkaBindings()
    if parts.scheme in ("amqp", "amqps"):
        return _AmqpBindings(unquote(parts.path[1:]) or "/")  # pika's rule for the vhost
    return _Bindings()


def _server(url: str) -> dict[str, Any]:
    """The server ``url`` names. Only its scheme, hosts and path are written: the user
    and password, and options that may hold secrets, never are."""
    parts = urlsplit(url)
    server = {"host": parts.netloc.rpartition("@")[2] or "localhost", "protocol": parts.scheme}
    if parts.scheme in ("amqp", "amqps"):
        server["protocolVersion"] = "0-9-1"
    if parts.path not in ("", "/"):
        server["pathname"] = parts.path
    return server


def _asyncapi_schema(node: Any) -> Any:
    """pydantic's JSON Schema as an AsyncAPI Schema, whose ``discriminator`` is the
    property's name where pydantic writes OpenAPI's object around it."""
    if isinstance(node, list):
        return [_asyncapi_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    return {
        key: value["propertyName"]
        if key == "discriminator" and isinstance(value, dict) and "propertyName" in value
        else _asyncapi_schema(value)
        for key, value in node.items()
    }


class _Document:
    """The channels, operations and components of a document, filled registration by
    registration."""

    def __init__(self, bindings: _Bindings, models: list[Any]) -> None:
        self.bindings = bindings
        self.channels: dict[str, dict[str, Any]] = {}
        self.operations: dict[str, dict[str, Any]] = {}
        self.messages: dict[str, dict[str, Any]] = {}
        self.schemas: dict[str, Any] = {}
        self.payloads: dict[Any, str] = {}  #: model -> its name under components/schemas
        if models:
            from pydantic.json_schema import models_json_schema

            refs, top = models_json_schema(
                [(model, "validation") for model in models],
                ref_template="#/components/schemas/{model}",
            )
            self.schemas.update(_asyncapi_schema(top.get("$defs", {})))
            self.payloads = {m: refs[m, "validation"]["$ref"].rpartition("/")[2] for m in models}

    def channel(self, topic: str, description: str = "", partitions: int | None = None) -> None:
        if topic in self.channels:
            return
        channel: dict[str, Any] = {"address": topic, "messages": {}}
        if description:
            channel["description"] = description
        if bindings := self.bindings.channel(topic, partitions):
            channel["bindings"] = bindings
        self.channels[topic] = channel

    def message(self, topic: str, model: Any, kind: str) -> dict[str, str]:
        """A reference to the message of ``kind`` with ``model``'s payload on ``topic``'s
        channel (made before), added to the channel and the components if new."""
        suffix, summary, extra = _KINDS[kind]
        payload_name = self.payloads[model] if model is not None else _ANY_VALUE
        name = payload_name + suffix
        if name not in self.messages:
            headers = f"polybus-{kind}-headers"
            self.schemas[headers] = {
                "type": "object",
                "properties": {h: _HEADERS[h] for h in (*_ENVELOPE, *extra)},
                "additionalProperties": {"type": "string"},  # the application's own headers
            }
            correlation = CAUSATION_ID if kind == "reply" else CORRELATION_ID
            message: dict[str, Any] = {
                "name": name,
                "headers": _ref("components", "schemas", headers),
                "payload": _ANY_PAYLOAD
                if model is None
                else _ref("components", "schemas", payload_name),
                "correlationId": {"location": f"$message.header#/{correlation}"},
            }
            if model is not None:
                message["contentType"] = JSON
            if summary:
                message["summary"] = summary
            self.messages[name] = message
        self.channels[topic]["messages"][name] = _ref("components", "messages", name)
        return _ref("channels", topic, "messages", name)

    def operation(
        self,
        name: str,
        action: str,
        topic: str,
        message: dict[str, str],
        description: str,
        group: str | None = None,
    ) -> dict[str, Any]:
        """Add the operation ``name``; a receive one names the ``group`` it reads in."""
        operation = {
            "action": action,
            "channel": _ref("channels", topic),
            "messages": [message],
            "description": description,
        }
        if group is not None and (bindings := self.bindings.receive(topic, group)):
            operation["bindings"] = bindings
        self.operations[name] = operation
        return operation

    def register(
        self, topic: str, handler: Any, options: dict[str, Any], replies: str | None
    ) -> None:
        """Add what a registration reads and writes (``replies``: a responder's reply topic)."""
        settings = _CONSUMER_DEFAULTS | options
        group, model = settings["group"], settings["model"]
        handled_by = f"`{getattr(handler, '__name__', 'handler')}` in "
        self.channel(topic)
        if replies is None:
            message = self.message(topic, model, "message")
            does = f"handles each message ({settings['guarantee']})."
        else:
            message = self.message(topic, model, "request")
            does = (
                "answers each request: its return value, or the exception it raises, is the reply."
            )
        reader = handled_by + self.bindings.reader(topic, group)
        receive = self.operation(
            f"{topic}.{group}.receive", "receive", topic, message, f"{reader} {does}", group
        )
        if summary := (inspect.getdoc(handler) or "").partition("\n")[0]:
            receive["summary"] = summary
        if replies is not None:
            self.channel(replies, f"Replies to the requests on `{topic}`.")
            receive["reply"] = {
                "channel": _ref("channels", replies),
                "messages": [self.message(replies, None, "reply")],
            }
        retry = NO_RETRY if settings["guarantee"] == "at-most-once" else settings["retry"]
        if retry.max_attempts > 1:  # the Consumer's rule for using the retry topic
            retries = retry_topic(topic, group)
            self.channel(retries, f"Retries of what `{group}` failed on `{topic}`, for it alone.")
            message = self.message(retries, model, "retry")
            tries = f"A failed message goes here for its next try ({retry.max_attempts} in all)."
            self.operation(f"{retries}.send", "send", retries, message, tries)
            again = handled_by + self.bindings.reader(retries, retries)  # a group of its name
            self.operation(
                f"{retries}.receive",
                "receive",
                retries,
                message,
                f"{again} tries it again.",
                retries,
            )
        if settings["dead_letters"]:
            dead = dead_letter_topic(topic, group)
            listed = f"What `{group}` gave up on from `{topic}`: see `polybus dlq`."
            self.channel(dead, listed, partitions=1)  # as the Consumer declares it
            message = self.message(dead, model, "dead-letter")
            gives_up = (
                "A message goes here when its last try failed, retrying cannot help, "
                "or it cannot be decoded."
            )
            self.operation(f"{dead}.send", "send", dead, message, gives_up)


def asyncapi_document(
    app: App, url: str | None = None, *, title: str | None = None, version: str = "1.0.0"
) -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document of ``app`` on the bus ``url`` (default: the app's), as
    JSON-ready data. Nothing is connected to: it describes what the registrations say.

    - ``servers``: the one ``url`` names (its hosts and path, never its user, password
      or options); none without a URL.
    - ``channels``: one per topic the handlers read and per topic they write: a
      group's retry topic (when its policy retries), its dead-letter topic (when dead
      letters are on), a responder's reply topic.
    - ``operations``: ``receive`` per handler (its docstring's first line is the
      summary, the group is in the description), with the ``reply`` of a responder;
      ``send`` and ``receive`` of the retries, ``send`` of the dead letters.
    - ``components``: the messages; the payload schema of a handler with ``model=`` is
      the pydantic model's, any value otherwise; the ``headers`` schema lists polybus's
      envelope, and the retry, dead-letter and request-reply headers where they apply.
    - bindings of the backend: Kafka (``topic``, the dead-letter topic's one partition,
      the consumer ``groupId``) and AMQP 0-9-1 (the topic's exchange, acks). Redis has
      no AsyncAPI binding, nor have the native log and memory: theirs carry none. Other
      topics' partition counts are left out: a topic that exists keeps its own.
    """
    url = app.url if url is None else url
    models = [r.options["model"] for r in app.registrations if r.options.get("model") is not None]
    document = _Document(_bindings(url), list(dict.fromkeys(models)))
    for registration in app.registrations:
        document.register(
            registration.topic, registration.handler, registration.options, registration.reply_topic
        )
    result: dict[str, Any] = {
        "asyncapi": "3.0.0",
        "info": {
            "title": title or "polybus app",
            "version": version,
            "description": "The topics a polybus App's handlers read and write.",
        },
        "defaultContentType": JSON,
    }
    if url:
        result["servers"] = {urlsplit(url).scheme: _server(url)}
    result |= {
        "channels": document.channels,
        "operations": document.operations,
        "components": {"schemas": document.schemas, "messages": document.messages},
    }
    return copy.deepcopy(result)  # the caller's to change: nothing shared with the tables here
