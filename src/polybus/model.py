"""The two rules of the topic/group model every backend shares: which names are
valid, and which partition a key goes to.

Kept apart from the engine so that the facade and the network adapters apply
them without loading it.
"""

from __future__ import annotations

import re

import google_crc32c

from .errors import ConfigurationError

__all__ = ["check_name", "partition_for_key"]

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")


def check_name(kind: str, name: str) -> str:
    """``name`` if it is a valid topic or group name (``kind`` says which) on every
    backend: 1-200 letters, digits, '.', '_' or '-', not starting with '.' or '-'.
    Raises ConfigurationError naming the rule otherwise."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigurationError(
            f"invalid {kind} name {name!r}: use 1-200 letters, digits, '.', '_' or '-', "
            "not starting with '.' or '-'"
        )
    return name


def partition_for_key(key: bytes, partitions: int) -> int:
    """The partition of ``key`` among ``partitions``: the same on every backend that uses it."""
    # CRC is linear: similar keys differ in few bits. The murmur3 finaliser spreads them.
    h = int(google_crc32c.value(key))
    h = ((h ^ (h >> 16)) * 0x85EBCA6B) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * 0xC2B2AE35) & 0xFFFFFFFF
    return (h ^ (h >> 16)) % partitions
