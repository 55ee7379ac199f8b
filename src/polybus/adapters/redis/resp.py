"""RESP on the wire: commands packed by hand, the reply shapes read back, stream id arithmetic.

Replies are read with redis-py's parser (``disable_decoding``, no response callbacks), so
they arrive as RESP2 lists or RESP3 maps; the reply helpers here accept both.
"""

from __future__ import annotations

from typing import Any


def _arg(a: bytes | str | int | float) -> bytes:
    if isinstance(a, bytes):
        return a
    if isinstance(a, str):
        return a.encode()
    return str(a).encode()


def _pack(*args: bytes | str | int | float) -> bytes:
    """One command in RESP. We pack ourselves: redis-py's per-argument packing costs more per
    message than the whole publish budget, and its reply callbacks reshape what we parse."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = _arg(a)
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _as_dict(reply: Any) -> dict[bytes, Any]:
    """A RESP2 flat ``[name, value, ...]`` list or a RESP3 map, as a dict."""
    if isinstance(reply, dict):
        return reply
    return dict(zip(reply[::2], reply[1::2], strict=True))


def _streams(reply: Any) -> list[tuple[bytes, list[Any]]]:
    """XREADGROUP's reply (RESP2 list of pairs, RESP3 map, or nil) as (stream, entries)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return list(reply.items())
    return [(s[0], s[1]) for s in reply]


def _before(entry_id: bytes) -> bytes:
    """The largest stream id smaller than ``entry_id`` (so that reading resumes at it)."""
    ms, _, seq = entry_id.partition(b"-")
    if int(seq or 0) > 0:
        return b"%d-%d" % (int(ms), int(seq) - 1)
    if int(ms) > 0:
        return b"%d-18446744073709551615" % (int(ms) - 1)
    return b"0-0"


def _id_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)
