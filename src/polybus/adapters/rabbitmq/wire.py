"""AMQP 0-9-1 on the wire, by hand: cutting deliveries out of the bytes a connection
reads, and encoding a record's content properties for publishing.

pika decodes each of a delivery's three frames into objects and its properties
through a generic codec, and encodes the same way when publishing, which costs more
than everything else polybus does per message. These functions work on bytes alone
(AMQP 0-9-1 section 4.2.3 for frames, 4.2.6.1 for content properties) with the
frame types, sizes, ids and property flags pika.spec names; pika_hooks plugs them
into pika's connection, the publisher into its frame writer.
"""

from __future__ import annotations

import base64
import functools
import struct
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pika  # type: ignore[import-untyped]
import pika.spec  # type: ignore[import-untyped]

from ...envelope import CONTENT_TYPE, CORRELATION_ID, MESSAGE_ID
from ...errors import ConfigurationError
from ..base import OutRecord
from .names import KEY_HEADER

_BROKER_HEADERS = frozenset({"x-delivery-count", "x-stream-offset"})
_LAX = "surrogateescape"  # text that is not UTF-8 keeps its bytes
_PROPERTIES = frozenset({MESSAGE_ID, CONTENT_TYPE, CORRELATION_ID})  # carried as AMQP properties
_KEY_NAME = bytes((len(KEY_HEADER),)) + KEY_HEADER.encode()  # as an AMQP short string

#: (delivery tag, redelivered, routing key, buffer, offset of the content properties, body)
_Sink = Callable[[int, bool, bytes, bytes, int, bytes], None]

_FRAME_METHOD = pika.spec.FRAME_METHOD
_FRAME_HEADER = pika.spec.FRAME_HEADER  # a content header frame
_FRAME_BODY = pika.spec.FRAME_BODY
_FRAME_END = pika.spec.FRAME_END  # the octet closing every frame
_FRAME_END_BYTE = bytes((_FRAME_END,))
_HEAD = pika.spec.FRAME_HEADER_SIZE  # a frame's head: type, channel, payload size
_END = pika.spec.FRAME_END_SIZE
_FRAMING = _HEAD + _END  # what a frame adds to its payload
_BASIC = pika.spec.Basic.INDEX  # the class id of a content header
_BASIC_DELIVER = pika.spec.Basic.Deliver.INDEX  # class id << 16 | method id

_FRAME_HEAD = struct.Struct(">BHI")  # frame type, channel, payload size
#: a method frame's head, its method (class id << 16 | method id), a short string's length
_DELIVER_HEAD = struct.Struct(">BHIIB")
_DELIVER_ARGS = struct.Struct(">QBB")  # delivery tag, redelivered, the exchange's length
_HEADER_HEAD = struct.Struct(">BHI4xQ")  # a content header frame's head, its body size
_HEADER_FRAME = struct.Struct(">BHIHHQ")  # frame head, class id, weight, body size
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_body_head = functools.partial(_FRAME_HEAD.pack, _FRAME_BODY)  # (channel, size) -> its head

_CONSUMER_TAG = _DELIVER_HEAD.size  # where a deliver frame's consumer tag starts
#: from a deliver's arguments to its routing key: the arguments, the key's length octet
_ROUTING_KEY = _DELIVER_ARGS.size + 1
_PROPERTY_FLAGS = _HEADER_HEAD.size  # where a content header frame's property flags start
_HEADER_MIN = _PROPERTY_FLAGS + _U16.size  # a content header frame up to its flags
_HEADER_ARGS = _HEADER_FRAME.size - _HEAD  # a content header's payload before its properties

_WAIT = -1  # _cut_deliveries: the delivery at the front is incomplete; wait for more data
#: a delivery larger than this is left to pika when it arrives in pieces: waiting for it
#: whole would copy the growing read buffer once per read
_WAIT_MAX = 1 << 17


def _cut_deliveries(buf: bytes, sinks: dict[bytes, _Sink]) -> int:
    """Hand the complete deliveries at the front of ``buf`` to their consumers' sinks.

    Returns the bytes used (0: the next frame is not a delivery to a sink), or _WAIT
    when the delivery at the front is not all there yet.
    """
    size = len(buf)
    pos = 0
    while size - pos > _CONSUMER_TAG:
        kind, channel, length, method, n = _DELIVER_HEAD.unpack_from(buf, pos)
        if kind != _FRAME_METHOD or method != _BASIC_DELIVER:
            return pos
        header = pos + length + _FRAMING  # the content header frame
        if header + _HEADER_MIN > size:
            return pos or _WAIT
        p = pos + _CONSUMER_TAG
        sink = sinks.get(buf[p : p + n])
        kind, header_channel, length, body_size = _HEADER_HEAD.unpack_from(buf, header)
        if (
            sink is None
            or kind != _FRAME_HEADER
            or header_channel != channel
            or buf[header - _END] != _FRAME_END
        ):
            return pos
        at = header + length + _FRAMING  # the first body frame
        if at > size:
            return pos or _WAIT
        if buf[at - _END] != _FRAME_END:
            return pos
        body, at = _body(buf, at, channel, body_size)
        if at <= 0:
            if at == 0 and body_size <= _WAIT_MAX:
                return pos or _WAIT
            return pos  # something else came between, or a big body in pieces: for pika
        p += n
        tag, redelivered, n = _DELIVER_ARGS.unpack_from(buf, p)
        p += n + _ROUTING_KEY  # past the exchange
        n = buf[p - 1]
        sink(tag, redelivered == 1, buf[p : p + n], buf, header + _PROPERTY_FLAGS, body)
        pos = at
    return pos


def _body(buf: bytes, at: int, channel: int, size: int) -> tuple[bytes, int]:
    """The body of ``size`` bytes in the frames from ``at``, and where they end; the end is
    0 if they are not all there yet, -1 if another frame comes between."""
    start = at + _HEAD
    end = start + size
    if end < len(buf) and buf[end] == _FRAME_END and buf[at:start] == _body_head(channel, size):
        return buf[start:end], end + _END  # the usual: one frame
    chunks = []
    while size:
        if len(buf) - at < _FRAMING:
            return b"", 0
        kind, body_channel, length = _FRAME_HEAD.unpack_from(buf, at)
        end = at + _HEAD + length
        if kind != _FRAME_BODY or body_channel != channel or length > size:
            return b"", -1
        if end >= len(buf):
            return b"", 0
        if buf[end] != _FRAME_END:
            return b"", -1
        chunks.append(buf[at + _HEAD : end])
        size -= length
        at = end + _END
    return b"".join(chunks), at


_BYTE = tuple(bytes((n,)) for n in range(256))  # n -> the octet n
_PERSISTENT = _BYTE[pika.spec.PERSISTENT_DELIVERY_MODE]  # a delivery-mode property
#: which content properties are present: bits of the flags that precede them
_FLAG_CONTENT_TYPE = pika.spec.BasicProperties.FLAG_CONTENT_TYPE
_FLAG_CONTENT_ENCODING = pika.spec.BasicProperties.FLAG_CONTENT_ENCODING
_FLAG_HEADERS = pika.spec.BasicProperties.FLAG_HEADERS
_FLAG_DELIVERY_MODE = pika.spec.BasicProperties.FLAG_DELIVERY_MODE
_FLAG_PRIORITY = pika.spec.BasicProperties.FLAG_PRIORITY
_FLAG_CORRELATION_ID = pika.spec.BasicProperties.FLAG_CORRELATION_ID
_FLAG_REPLY_TO = pika.spec.BasicProperties.FLAG_REPLY_TO
_FLAG_EXPIRATION = pika.spec.BasicProperties.FLAG_EXPIRATION
_FLAG_MESSAGE_ID = pika.spec.BasicProperties.FLAG_MESSAGE_ID
_FLAG_TIMESTAMP = pika.spec.BasicProperties.FLAG_TIMESTAMP


def _shortstr(text: str) -> bytes:
    """``text`` as an AMQP short string; ConfigurationError past 255 bytes."""
    data = text.encode("utf-8", _LAX)
    if len(data) > 255:
        raise ConfigurationError(
            f"{text[:40]!r}... is longer than 255 bytes (an AMQP short string)"
        )
    return _BYTE[len(data)] + data


def _content(record: OutRecord) -> tuple[str, bytes]:
    """The routing key and the AMQP content properties (flags first; AMQP 0-9-1 section
    4.2.6.1) of ``record``, a persistent message.

    Envelope headers become their AMQP properties (unless too long for one), the
    others a table; a key that is not a short text travels base64'd in a header.
    Raises ConfigurationError for a header name AMQP cannot carry.
    """
    content_type = message_id = correlation_id = b""
    table: list[bytes] = []
    for name, value in record.headers:
        data = value.encode("utf-8", _LAX)
        if len(data) <= 255 and name in _PROPERTIES:
            if name == MESSAGE_ID:
                message_id = _BYTE[len(data)] + data
            elif name == CONTENT_TYPE:
                content_type = _BYTE[len(data)] + data
            else:
                correlation_id = _BYTE[len(data)] + data
        else:
            table += (_shortstr(name), b"S", _U32.pack(len(data)), data)
    routing_key = ""
    key = record.key
    if key is not None:
        try:
            routing_key = key.decode() if len(key) <= 255 else ""
        except UnicodeDecodeError:
            pass
        if not routing_key:
            data = base64.b64encode(key)
            table += (_KEY_NAME, b"S", _U32.pack(len(data)), data)
    flags = _FLAG_DELIVERY_MODE
    parts = [b""]
    if content_type:
        flags |= _FLAG_CONTENT_TYPE
        parts.append(content_type)
    if table:
        flags |= _FLAG_HEADERS
        encoded = b"".join(table)
        parts += (_U32.pack(len(encoded)), encoded)
    parts.append(_PERSISTENT)
    if correlation_id:
        flags |= _FLAG_CORRELATION_ID
        parts.append(correlation_id)
    if message_id:
        flags |= _FLAG_MESSAGE_ID
        parts.append(message_id)
    if record.timestamp_ms > 0:
        flags |= _FLAG_TIMESTAMP
        parts.append(_U64.pack(record.timestamp_ms // 1000))  # seconds; ms stay in a header
    parts[0] = _U16.pack(flags)
    return routing_key, b"".join(parts)


def _pika_properties(content: bytes) -> Any:
    """``content`` (as from _content) as pika properties."""
    properties = pika.BasicProperties()
    properties.decode(content)
    return properties


def _text(value: object) -> str:
    """A header value from any client as text (AMQP tables carry many types)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, datetime):
        # an AMQP timestamp is UTC; pika before 1.4 decodes it without saying so
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
