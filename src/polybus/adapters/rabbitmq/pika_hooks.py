"""Every use of pika's private names, behind a few named functions and one class.

The adapter reaches under pika's public API in five places: three for speed, one to
keep a queue's order when a subscription closes, one to learn pika's URL options.

- **cutting deliveries**: ``_Connection`` overrides pika's ``_on_data_available`` to
  cut deliveries for its consumers straight out of pika's read buffer
  (``_frame_buffer``, ``_trim_frame_buffer``) with ``wire._cut_deliveries``, and hands
  every other frame to pika (``_read_frame``, ``_process_frame``). Consumers are
  registered by ``_consume`` both there (``sinks``) and with pika through the public
  ``basic_consume``, with ``_via_pika`` as the callback, so what the shortcut leaves
  (a big body arriving in pieces) pika decodes and delivers itself.
- **reading in bulk**: a consuming connection raises its transport's
  ``_MAX_RECV_BYTES`` (from ``_proto_connection_made``).
- **writing frames**: ``frame_emitter`` gives the publisher pika's ``_adapter_emit_data``,
  which writes the frames it builds for many messages with one socket write.
- **closing without cancel**: ``close_without_cancel`` hides a consumer from the
  channel's ``_consumers`` while it closes.
- **URL options**: ``URL_OPTIONS`` are read off ``URLParameters``' ``_set_url_*``
  setters.

It also quiets one pika log line: the adapter asks the broker whether an exchange or
queue exists with passive declares, and pika logs every "no" (a 404 Channel.Close)
as a WARNING. ``_QuietProbes`` drops that line for this adapter's own connections
only; a 404 that matters reaches the caller as a polybus error anyway.

At import this module checks that pika still has each of them (attributes of pika's
classes, and for the attributes pika sets per instance, that the pika method the
shortcut relies on uses them) and sets a flag per shortcut. Where something is
missing it logs a warning naming it and the adapter takes pika's public path
instead; nothing fails to import. Without ``CUTS_DELIVERIES``, ``_Connection`` leaves
``_on_data_available`` to pika and every delivery arrives through ``_via_pika``: the
same records, decoded more slowly. Without ``READS_IN_BULK``, consuming connections
read pika's 4 KiB per ``recv()``. Without ``WRITES_FRAMES``, ``frame_emitter`` returns
None and the publisher sends each message with ``basic_publish`` (the switch that
``test_publishing_without_the_frame_writer_shortcut`` exercises). Without
``CLOSES_WITHOUT_CANCEL``, closing a subscription lets pika cancel its consumer
first; a quorum queue then puts the deliveries still in flight behind the messages
waiting, so the next member of the group may read those few out of publish order.
Without the URL setters, ``URL_OPTIONS`` is the list pika 1.x documents.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pika  # type: ignore[import-untyped]
import pika.channel  # type: ignore[import-untyped]
from pika.adapters.select_connection import SelectConnection  # type: ignore[import-untyped]
from pika.adapters.utils import io_services_utils  # type: ignore[import-untyped]

from .wire import _LAX, _WAIT, _cut_deliveries, _Sink, _text

log = logging.getLogger(__package__)  # the adapter's logger: polybus.adapters.rabbitmq

_BULK_READ = 1 << 17  # bytes per recv() on a consuming connection
#: the query options pika 1.x documents for URLParameters
_PIKA_1_URL_OPTIONS = (
    "blocked_connection_timeout",
    "channel_max",
    "client_properties",
    "connection_attempts",
    "frame_max",
    "heartbeat",
    "locale",
    "retry_delay",
    "socket_timeout",
    "ssl_options",
    "stack_timeout",
    "tcp_options",
)


def _lacks(owner: Any, *names: str, used_by: str = "") -> list[str]:
    """Those of ``names`` that pika's class ``owner`` has no attribute for; with
    ``used_by``, those its method ``used_by`` neither reads nor sets (attributes pika
    sets per instance)."""
    where = getattr(owner, "__qualname__", "pika's stream transport")
    if used_by:
        code = getattr(getattr(owner, used_by, None), "__code__", None)
        present = set(code.co_names) if code is not None else set()
        return [f"{where}.{used_by} using self.{name}" for name in names if name not in present]
    return [f"{where}.{name}" for name in names if not hasattr(owner, name)]


def _available(missing: list[str], fallback: str) -> bool:
    """True if nothing is ``missing``; else logs what pika lacks and the path taken instead."""
    if missing:
        version = getattr(pika, "__version__", "?")
        log.warning("polybus: pika %s lacks %s; %s", version, ", ".join(missing), fallback)
    return not missing


#: deliveries are cut out of the read buffer (else pika decodes them; see _via_pika)
CUTS_DELIVERIES = _available(
    _lacks(
        SelectConnection,
        "_on_data_available",
        "_read_frame",
        "_trim_frame_buffer",
        "_process_frame",
    )
    + _lacks(SelectConnection, "_frame_buffer", used_by="_read_frame")
    + _lacks(SelectConnection, "_frame_buffer", used_by="_trim_frame_buffer"),
    "pika decodes every delivery itself (the same records, more slowly)",
)
#: a consuming connection reads _BULK_READ bytes per recv() (else pika's 4 KiB)
READS_IN_BULK = _available(
    _lacks(SelectConnection, "_proto_connection_made")
    + _lacks(getattr(io_services_utils, "_AsyncTransportBase", None), "_MAX_RECV_BYTES"),
    "consuming connections read 4 KiB per recv() (more slowly)",
)
#: the publisher writes the frames it builds itself (else basic_publish per message)
WRITES_FRAMES = _available(
    _lacks(SelectConnection, "_adapter_emit_data"),
    "messages are published with basic_publish, one send() per frame (more slowly)",
)
#: a closing subscription's channel skips basic.cancel (else pika cancels first)
CLOSES_WITHOUT_CANCEL = _available(
    _lacks(pika.channel.Channel, "_consumers", used_by="close"),
    "closing a subscription cancels its consumer first: a quorum queue puts the "
    "deliveries in flight behind the waiting messages, out of publish order",
)
_setters = [n for n in dir(pika.URLParameters) if n.startswith("_set_url_")]
#: pika's own URL query options, passed through to pika.URLParameters
URL_OPTIONS: tuple[str, ...] = (
    tuple(sorted(n.removeprefix("_set_url_") for n in _setters))
    if _available(
        [] if _setters else ["URLParameters._set_url_*"],
        "URL options are checked against the list pika 1.x documents",
    )
    else _PIKA_1_URL_OPTIONS
)


class _Connection(SelectConnection):  # type: ignore[misc]
    """A SelectConnection that cuts deliveries to the consumers in ``sinks`` straight out
    of its read buffer; every other frame takes pika's path.

    pika decodes each of a delivery's three frames into objects, and its properties
    through a generic codec, which costs more than everything else done per message.
    Where this pika lacks the hooks (``CUTS_DELIVERIES``, ``READS_IN_BULK``), the
    overrides are left out and pika reads and decodes as it does on its own.
    """

    def __init__(self, *, bulk: bool, **kwargs: Any) -> None:
        self.sinks: dict[bytes, _Sink] = {}  # consumer tag -> sink
        self._bulk = bulk
        super().__init__(**kwargs)

    if READS_IN_BULK:

        def _proto_connection_made(self, transport: Any) -> None:
            if self._bulk and hasattr(transport, "_MAX_RECV_BYTES"):
                # pika reads 4 KiB at a time: per read, a trip through the event loop and a
                # chance for the GIL to change threads. (Not for connections whose frames
                # all take pika's path: it copies what is left of the buffer after every
                # frame.)
                transport._MAX_RECV_BYTES = _BULK_READ
            super()._proto_connection_made(transport)

    if CUTS_DELIVERIES:

        def _on_data_available(self, data_in: bytes) -> None:
            if not self.sinks:
                super()._on_data_available(data_in)
                return
            self._frame_buffer += data_in
            while self._frame_buffer:
                used = _cut_deliveries(self._frame_buffer, self.sinks)
                if used == _WAIT:
                    return
                if used:
                    self._trim_frame_buffer(used)
                    continue
                consumed, frame = self._read_frame()
                if not frame:
                    return
                self._trim_frame_buffer(consumed)
                self._process_frame(frame)


def _via_pika(sink: _Sink) -> Callable[[Any, Any, Any, bytes], None]:
    """A pika consumer callback feeding ``sink``: for the deliveries pika decoded itself."""

    def deliver(_channel: Any, method: Any, properties: Any, body: bytes) -> None:
        if properties.headers:  # as text what pika decodes but cannot encode (floats)
            properties.headers = {  # an int stays one, in pika's own int type too (a long)
                k: v if isinstance(v, (str, bytes, int)) else _text(v)
                for k, v in properties.headers.items()
            }
        key = method.routing_key
        key = key.encode("utf-8", _LAX) if isinstance(key, str) else bytes(key)
        sink(method.delivery_tag, method.redelivered, key, b"".join(properties.encode()), 0, body)

    return deliver


def _consume(
    channel: Any,
    queue: str,
    sink: _Sink,
    callback: Callable[[Any], None],
    arguments: dict[str, Any] | None = None,
) -> str:
    """basic.consume ``queue`` on ``channel`` (of a _Connection), every delivery to ``sink``.

    Returns the consumer tag.
    """
    tag: str = channel.basic_consume(queue, _via_pika(sink), arguments=arguments, callback=callback)
    sinks = channel.connection.sinks
    key = tag.encode()
    sinks[key] = sink
    channel.add_on_close_callback(lambda _ch, _reason: sinks.pop(key, None))
    return tag


def frame_emitter(connection: Any) -> Callable[[bytes], None] | None:
    """What writes bytes to ``connection``'s socket as they are (pika's own frame writer),
    or None where this pika has none: then publish with ``basic_publish``."""
    if not WRITES_FRAMES:
        return None
    emit: Callable[[bytes], None] | None = getattr(connection, "_adapter_emit_data", None)
    return emit


def close_without_cancel(channel: Any, tag: str | None) -> None:
    """Close ``channel`` without a basic.cancel for its consumer ``tag``.

    pika cancels each consumer it knows before closing, so hide ours and drop what
    still arrives (it is unacked, so the broker returns it too). Where pika keeps no
    such table, the channel closes the ordinary way.
    """
    consumers = getattr(channel, "_consumers", None) if CLOSES_WITHOUT_CANCEL else None
    if tag is not None and isinstance(consumers, dict) and tag in consumers:
        del consumers[tag]
        channel.close()
        consumers[tag] = lambda *_: None
    else:
        channel.close()


class _QuietProbes(logging.Filter):
    """Drops pika's WARNING for a 404 Channel.Close on a connection of this adapter."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 3 and args[0] == 404:
            return not isinstance(getattr(args[2], "connection", None), _Connection)
        return True


logging.getLogger("pika.channel").addFilter(_QuietProbes())
