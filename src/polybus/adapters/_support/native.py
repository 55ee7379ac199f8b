"""One way to open the native engine's log from a URL: ``native:///path`` or ``memory://``.

The native backend, the native session store and the native inbox open their log
here, so they take the same URLs and options: ``fsync=always|interval|never``
(default interval), ``fsync_interval=<seconds>`` and ``skip_corrupt=true``.
``memory://name`` is one in-memory log shared by everything in the process that
opens that name (until the last user closes it); plain ``memory://`` is the
process's default one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from typing import cast
from urllib.parse import unquote

from ...log import FsyncPolicy, Log
from .options import Options

__all__ = ["LOG_OPTIONS", "log_options", "open_log"]

LOG_OPTIONS = frozenset({"fsync", "fsync_interval", "skip_corrupt"})
SCHEMES = ("native", "memory")

_shared: dict[str, tuple[Log, int]] = {}  # memory://name -> (log, users)
_shared_lock = threading.Lock()


def log_options(url: str, ours: Collection[str] = ()) -> Options:
    """``url``'s options: the log's and ``ours``; ConfigurationError for any other."""
    options = Options(url, ours={*ours, *LOG_OPTIONS}, what="native")
    if options.parts.scheme not in SCHEMES:
        raise options.error("not a native URL: use native:///absolute/path or memory://[name]")
    return options


def open_log(options: Options) -> tuple[Log, Callable[[], None]]:
    """The log ``options``' URL names, and how to let go of it: closing a directory's
    log, or leaving a shared in-memory one (closed when its last user leaves)."""
    parts = options.parts
    if parts.scheme == "memory":
        name = parts.netloc + parts.path
        with _shared_lock:
            log, users = _shared.get(name, (None, 0))
            if log is None or log.closed:
                log, users = Log(None), 0
            _shared[name] = (log, users + 1)
        return log, lambda: _leave(name, log)
    if parts.netloc:
        raise options.error(
            f"names the host {parts.netloc!r}, not a directory: write "
            f"native:///{parts.netloc}{parts.path} for the absolute path "
            f"/{parts.netloc}{parts.path} (three slashes)"
        )
    path = unquote(parts.path)
    if not path:
        raise options.error("names no directory: use native:///absolute/path")
    log = Log(
        path,
        fsync=cast(FsyncPolicy, options.text("fsync", "interval", ("always", "interval", "never"))),
        fsync_interval=options.seconds("fsync_interval", 1.0),
        skip_corrupt=options.flag("skip_corrupt", False),
    )
    return log, log.close


def _leave(name: str, log: Log) -> None:
    with _shared_lock:
        current, users = _shared.get(name, (None, 0))
        if current is not log:
            return
        if users > 1:
            _shared[name] = (log, users - 1)
            return
        del _shared[name]
    log.close()
