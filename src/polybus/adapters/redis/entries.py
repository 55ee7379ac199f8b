"""Stream entries and records: the entry layout, read into InRecords and packed from OutRecords.

An entry's fields are ``value``, ``key`` (only when the record has one) and ``h:<name>`` per
header; an entry a plain client wrote without ``value`` arrives as JSON (see the package
docstring). Both directions run once per message, so they work on bytes directly and cache
header names.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, cast

import msgpack

from ..base import Delivery, OutRecord
from .resp import _pack

if TYPE_CHECKING:
    from .backend import _Topic


def _handle(record: Delivery) -> tuple[int, bytes]:
    """The (partition, stream id) a record was read from, for XACK and XCLAIM."""
    return cast(tuple[int, bytes], record.handle)


def _decode(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _plain_value(fields: list[bytes]) -> bytes:
    """The payload of an entry a plain client wrote without our layout: its fields as JSON."""
    it = iter(fields)
    text = "utf-8", "backslashreplace"  # any bytes, readably: JSON needs valid text
    obj = {k.decode(*text): v.decode(*text) for k, v in zip(it, it, strict=True)}
    return json.dumps(obj, ensure_ascii=False).encode()


_header_names: dict[bytes, str] = {}  # field -> header name; few distinct names in practice


def _header_name(f: bytes) -> str:
    name = _header_names.get(f)
    if name is None:
        name = _decode(f[2:])
        if len(_header_names) < 1024:
            _header_names[f] = name
    return name


def _record(
    topic: str, partition: int, entry_id: bytes, fields: list[bytes], attempt: int
) -> Delivery:
    value: bytes | None = None
    key: bytes | None = None
    headers: list[tuple[str, str]] = []
    plain: list[tuple[str, str]] = []
    names = _header_names
    for i in range(0, len(fields) - 1, 2):
        f = fields[i]
        if f == b"value":
            value = fields[i + 1]
        elif f[:2] == b"h:":
            headers.append(
                (names.get(f) or _header_name(f), fields[i + 1].decode("utf-8", "surrogateescape"))
            )
        elif f == b"key":
            key = fields[i + 1]
        else:
            plain.append((_decode(f), _decode(fields[i + 1])))
    if value is None:  # not our layout: hand over every field, as JSON
        value, key = _plain_value(fields), None
        headers = [("content-type", "application/json")]
    elif plain:
        have = {name for name, _ in headers}
        headers.extend(h for h in plain if h[0] not in have)
    offset = entry_id.decode()
    return Delivery(
        topic,
        partition,
        offset,
        value,
        key,
        tuple(headers),
        int(offset.partition("-")[0]),
        attempt,
        (partition, entry_id),
    )


class _Packer:
    """Packs XADD and delayed-record commands, caching the packed header field names."""

    __slots__ = ("_fields",)

    def __init__(self) -> None:
        self._fields: dict[str, bytes] = {}

    def _field(self, name: str) -> bytes:
        f = self._fields.get(name)
        if f is None:
            b = b"h:" + name.encode("utf-8", "surrogateescape")
            f = self._fields[name] = b"$%d\r\n%s\r\n" % (len(b), b)
        return f

    def xadd(self, head: bytes, r: OutRecord) -> bytes:
        v = cast(bytes, r.value)  # publish refuses tombstones
        k = r.key
        hs = r.headers
        parts = [
            b"*%d\r\n$4\r\nXADD\r\n" % (5 + 2 * len(hs) + (0 if k is None else 2)),
            head,
            b"$5\r\nvalue\r\n$%d\r\n" % len(v),
            v,
            b"\r\n",
        ]
        if k is not None:
            parts += (b"$3\r\nkey\r\n$%d\r\n" % len(k), k, b"\r\n")
        field_for = self._field
        for name, value in hs:
            vb = value.encode("utf-8", "surrogateescape")
            parts += (field_for(name), b"$%d\r\n" % len(vb), vb, b"\r\n")
        return b"".join(parts)

    @staticmethod
    def delayed(t: _Topic, p: int, r: OutRecord) -> bytes:
        # msgpack without the bin type: Redis's Lua cmsgpack reads only the old raw strings
        fields: list[Any] = [os.urandom(8), p, b"value", r.value]  # nonce: members must differ
        if r.key is not None:
            fields += (b"key", r.key)
        for name, value in r.headers:
            fields += (
                b"h:" + name.encode("utf-8", "surrogateescape"),
                value.encode("utf-8", "surrogateescape"),
            )
        member = msgpack.packb(fields, use_bin_type=False)
        return _pack(b"ZADD", t.delayed, r.not_before_ms, member)
