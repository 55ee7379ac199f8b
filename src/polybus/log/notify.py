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
        if _libc is not None:
            fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
            if fd >= 0:
                self._fd = fd

    def watch(self, path: str) -> None:
        if path in self._watched:
            return
        self._watched.add(path)
        if self._fd >= 0 and _libc is not None:
            _libc.inotify_add_watch(self._fd, os.fsencode(path), _IN_MODIFY)

    def drain(self) -> None:
        """Forget events seen so far (call before re-checking the condition)."""
        if self._fd >= 0:
            try:
                while os.read(self._fd, 65536):
                    pass
            except BlockingIOError:
                pass

    def wait(self, timeout: float) -> None:
        if timeout <= 0:
            return
        if self._fd >= 0:
            select.select([self._fd], [], [], timeout)
        else:
            time.sleep(min(timeout, 0.005))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
