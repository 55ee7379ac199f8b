"""The adapter's Lua scripts, read from this package's ``.lua`` files at import.

Each ``.lua`` file starts with a comment naming its KEYS and ARGV. A script runs on the node
holding a topic's keys (they share the hash tag ``{<topic>}``), by its SHA-1 (EVALSHA); when
the server does not know it (NOSCRIPT) the backend loads them all (SCRIPT LOAD) and tries again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib.resources import files

from .resp import _pack


@dataclass(frozen=True)
class _Script:
    source: bytes
    sha: bytes = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source).hexdigest().encode())


def _load(name: str) -> _Script:
    return _Script(files(__package__).joinpath(f"{name}.lua").read_bytes())


_DECLARE = _load("declare")
_MOVE_DUE = _load("move_due")
_CLAIM = _load("claim")
_RELEASE = _load("release")
_READ = _load("read")

_SCRIPTS = (_DECLARE, _MOVE_DUE, _CLAIM, _RELEASE, _READ)


def _evalsha(script: _Script, keys: Sequence[bytes], args: Iterable[bytes | str | int]) -> bytes:
    return _pack(b"EVALSHA", script.sha, len(keys), *keys, *args)
