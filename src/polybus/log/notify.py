"""Cross-process wake-ups: block on a file descriptor until a partition changes.

On Linux an inotify descriptor watches each partition's ``head`` file; every
append ends with a ``pwrite`` there that the kernel reports as a modify event,
so writers make no extra call and a waiting reader wakes within microseconds. Elsewhere the
waiter falls back to short sleeps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import time

_IN_MODIFY = 0x002
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC

_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _libc.inotify_init1.argtypes = [ctypes.c_int]
    _libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
except (OSError, AttributeError):
    _libc = None


class Waiter:
    """Wait until any watched file is written, or a timeout passes.

    ``wait`` may return early (spurious wake-ups are allowed); callers re-check
    their condition. Not thread-safe; one per reader.
    """

    def __init__(self) -> None:
        self._fd = -1
        self._watched: set[str] = set()
        self._poller = select.poll()
        if _libc is not None:
            fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
            if fd >= 0:
                self._fd = fd
                self._poller.register(fd, select.POLLIN)

    def watch(self, path: str) -> None:
        if path in self._watched:
            return
        self._watched.add(path)
        if self._fd >= 0 and _libc is not None:
            _libc.inotify_add_watch(self._fd, os.fsencode(path), _IN_MODIFY)

    def wait(self, timeout: float) -> None:
        """Block until a watched file is written or ``timeout`` seconds pass.

        Events are consumed on wake-up; one that arrived since the caller last
        checked its condition makes this return at once, so none is lost.
        """
        if timeout <= 0:
            return
        if self._fd < 0:
            time.sleep(min(timeout, 0.005))
        elif self._poller.poll(max(1, int(timeout * 1000))):
            try:
                os.read(self._fd, 65536)
            except BlockingIOError:
                pass

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
