"""CloudEvents in binary content mode: an opt-in envelope that any CloudEvents SDK reads.

>>> from polybus.cloudevents import CloudEvents, attributes
>>> bus = polybus.connect(url, middleware=[CloudEvents(source="/billing")])
>>> bus.publish("invoice.created", invoice, key="invoice-42")
>>> attributes(delivery)["subject"]                     # on the consuming side
'invoice-42'

Each published record becomes a CloudEvents 1.0 event too: its attributes are added
as headers, the value is the event's data as it was, and polybus's own envelope stays
(a CloudEvents reader ignores it), so retries, dead letters, inboxes and replays work
as before. It is a :class:`~polybus.middleware.Middleware`, not a setting of the bus,
so that it costs nothing where it is not used (a bus without a publish hook calls the
backend directly), composes with other middleware, and covers every publish: the
user's, a transaction's, retries, dead letters, replies and a worker's outputs.

========================  =================================================================
attribute                 from
========================  =================================================================
``specversion``           "1.0"
``id``                    the message id
``time``                  the message timestamp, RFC 3339 in UTC with milliseconds
``source``                ``CloudEvents(source=...)``
``type``                  ``CloudEvents(type=...)``, else the topic's name
``subject``               the message key, when it is text: in a keyed topic the
                          key names what the event is about
``datacontenttype``       the content type, which each binding carries as its own
                          (``application/octet-stream`` for bytes, which polybus
                          otherwise sends without one)
extensions                those a message gives (below)
========================  =================================================================

A message sets or overrides an attribute with a header named ``ce_<attribute>``
(``headers={"ce_type": "com.acme.invoice.voided", "ce_tenant": "acme"}``); every
binding's prefix below is accepted and written as the backend's. Attribute names
are lowercase letters and digits; ``id`` and ``time`` always come from polybus's
envelope when the record has it (a record published raw, without one, keeps its own).

Header names per backend (:attr:`polybus.Bus.wire_protocol` picks them; ``prefix=``
overrides):

- Kafka (``kafka``): the Kafka protocol binding, ``ce_<attribute>`` headers and the
  ``content-type`` header. The key is the event's ``partitionkey`` to a
  CloudEvents reader, as that binding says.
- RabbitMQ (``amqp-0-9-1``): RabbitMQ speaks AMQP 0-9-1, for which CloudEvents has no
  binding of its own; the official AMQP binding is for AMQP 1.0 application-properties
  (``cloudEvents:<attribute>``). polybus writes the RabbitMQ binding that Knative
  Eventing defined and the CloudEvents SDK implements (``cloudevents.core.bindings.rabbitmq``):
  ``ce-<attribute>`` in the headers table and the ``content_type`` property. For
  consumers on the AMQP 1.0 binding (RabbitMQ 4 hands an AMQP 0-9-1 header to AMQP 1.0
  clients as an application-property) give ``prefix="cloudEvents:"``.
- Redis and the native engine (``redis``, ``native``): CloudEvents has no binding for
  them; polybus uses the Kafka one. On Redis a header is the stream field
  ``h:<name>``, so the attributes are fields ``h:ce_<attribute>`` beside ``value``
  (an entry another client wrote with plain ``ce_<attribute>`` fields reads the same).

Reading needs no option: a record an SDK published (a CloudEvent without polybus's
id) becomes a :class:`~polybus.message.Message` whose id, timestamp and content type
are the event's (:func:`polybus.message.message_of`), under any of the prefixes above,
on any backend; its key stays the backend's key (a subject does not become one).
:func:`attributes` gives a message's attributes by name; they are in
``message.headers`` too, under the names they travelled with. Structured content mode
(the whole event as JSON in the value) is neither read nor written.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

from .envelope import (
    CLOUDEVENTS_PREFIX,
    CLOUDEVENTS_PREFIXES,
    CLOUDEVENTS_RABBITMQ_PREFIX,
    CONTENT_TYPE,
    KEY_BINARY,
    MESSAGE_ID,
    TIMESTAMP,
)
from .errors import ConfigurationError
from .message import Delivery, Message, uuid7
from .middleware import Host, Middleware, PublishNext
from .types import OutRecord, Receipt, tuple_new

__all__ = ["CloudEvents", "attributes"]

SPECVERSION = "1.0"
#: a binding's attribute prefix by wire protocol; any other protocol uses the Kafka one
_PREFIXES = {"amqp-0-9-1": CLOUDEVENTS_RABBITMQ_PREFIX}
_BYTES = "application/octet-stream"
_new_record = tuple_new(OutRecord, 5)  # a record in 0.17 us, where _replace took 0.6
_ATTRIBUTE_NAME = re.compile(r"[a-z0-9]+")  # CloudEvents 1.0, section "Attribute Naming"


def _attribute(header: str) -> str | None:
    """The attribute a header holds under any binding's prefix, or None."""
    if header.startswith(CLOUDEVENTS_PREFIXES):
        for prefix in CLOUDEVENTS_PREFIXES:
            if header.startswith(prefix):
                return header[len(prefix) :]
    return None


def _rfc3339(epoch_ms: int) -> str:
    seconds, ms = divmod(epoch_ms, 1000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))}.{ms:03d}Z"


class CloudEvents(Middleware):
    """Publish every message as a CloudEvent in binary content mode (see the module).

    ``source`` (a URI reference, e.g. "/billing" or "https://acme.com/billing") and
    ``type`` (default: the topic's name) are the attributes of every event unless a
    message gives its own. ``prefix`` replaces the header prefix the backend's binding
    uses. Raises ConfigurationError for an empty ``source`` or ``type``, and when added
    to a second bus whose binding names headers otherwise (give each its own).
    """

    def __init__(self, source: str, *, type: str | None = None, prefix: str | None = None):
        if not source:
            raise ConfigurationError("CloudEvents needs a source, e.g. CloudEvents(source='/app')")
        if type == "":
            raise ConfigurationError("a CloudEvents type cannot be empty; omit it for the topic")
        self.source = source
        self.type = type
        self._prefix = prefix  #: the headers' prefix: given, or set by attach
        self._prefix_given = prefix is not None
        #: the last polybus timestamp formatted and its text: a batch's messages share one,
        #: and formatting took 0.9 of the 3.2 us a record cost
        self._last_time = ("", "")

    def attach(self, bus: Host) -> None:
        if self._prefix_given:
            return
        prefix = _PREFIXES.get(bus.wire_protocol, CLOUDEVENTS_PREFIX)
        if self._prefix not in (None, prefix):
            raise ConfigurationError(
                f"this CloudEvents envelope writes {self._prefix!r} headers for another bus, "
                f"and a {bus.wire_protocol} bus's binding writes {prefix!r}: give each bus "
                "its own CloudEvents(...)"
            )
        self._prefix = prefix

    def publish(
        self, topic: str, records: Sequence[OutRecord], call_next: PublishNext
    ) -> list[Receipt]:
        prefix = self._prefix
        if prefix is None:
            raise ConfigurationError(
                "add CloudEvents to a bus (connect(url, middleware=[...]) or bus.use) "
                "before publishing through it"
            )
        return call_next(topic, [self._event(topic, record, prefix) for record in records])

    def _event(self, topic: str, record: OutRecord, prefix: str) -> OutRecord:
        """``record`` with the attributes of its event as headers, in the binding's naming."""
        given: dict[str, str] = {}  # attributes the record carries, by name
        headers: list[tuple[str, str]] = []
        message_id = stamp = content_type = None
        binary_key = False
        for name, value in record.headers:
            if name.startswith(CLOUDEVENTS_PREFIXES):
                attribute = _attribute(name) or ""
                if not _ATTRIBUTE_NAME.fullmatch(attribute):
                    raise ConfigurationError(
                        f"header {name!r}: a CloudEvents attribute name is lowercase "
                        "letters and digits"
                    )
                given[attribute] = value
                continue
            if name == MESSAGE_ID:
                message_id = value
            elif name == TIMESTAMP:
                stamp = value
            elif name == CONTENT_TYPE:
                content_type = value
            elif name == KEY_BINARY:
                binary_key = True
            headers.append((name, value))
        # polybus's envelope first, then what the record carries, then the defaults
        given.pop("specversion", None)  # these events are 1.0, whatever a copy said
        given_id, given_time = given.pop("id", None), given.pop("time", None)
        source = given.pop("source", None) or self.source
        event_type = given.pop("type", None) or self.type or topic
        if stamp is not None and stamp.isdigit():
            last_stamp, event_time = self._last_time
            if stamp != last_stamp:
                event_time = _rfc3339(int(stamp))
                self._last_time = (stamp, event_time)
        else:
            event_time = given_time or _rfc3339(record.timestamp_ms or int(time.time() * 1000))
        data_type = given.pop("datacontenttype", None)
        if content_type is None and record.value is not None:
            headers.append((CONTENT_TYPE, data_type or _BYTES))
        headers += [
            (prefix + "specversion", SPECVERSION),
            (prefix + "id", message_id or given_id or uuid7()),
            (prefix + "source", source),
            (prefix + "type", event_type),
            (prefix + "time", event_time),
        ]
        subject = given.pop("subject", None)
        if subject is None and record.key is not None and not binary_key:
            subject = record.key.decode("utf-8", "surrogateescape")
        if subject is not None:
            headers.append((prefix + "subject", subject))
        headers += [(prefix + name, value) for name, value in given.items()]  # extensions
        payload, key, _, timestamp_ms, not_before_ms = record
        return _new_record(OutRecord, (payload, key, tuple(headers), timestamp_ms, not_before_ms))


def attributes(message: Message | Delivery) -> dict[str, str]:
    """The CloudEvents attributes of ``message`` by name (``id``, ``source``, ``type``,
    ``subject``, ``time``, extensions, and its content type as ``datacontenttype``),
    read from its headers under any binding's prefix; empty for a message that is no
    CloudEvent."""
    if isinstance(message, Delivery):
        message = message.message
    found = {}
    for name, value in message.headers.items():
        attribute = _attribute(name)
        if attribute is not None:
            found[attribute] = value
    if found and message.content_type is not None:
        found.setdefault("datacontenttype", message.content_type)
    return found
