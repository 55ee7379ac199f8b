"""Cross-process wake-ups: block on a file descriptor until a partition changes.

On Linux an inotify descriptor watches partition directories; every append
is a ``pwrite`` that the kernel reports as a modify event, so writers pay
nothing extra and a waiting reader wakes within microseconds. Elsewhere the
waiter falls back to short sleeps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import time

_IN_MODIFY = 0x002
_IN_CREATE = 0x100
_IN_MOVED_TO = 0x080
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
    """Wait until any watched directory sees a write, or a timeout passes.

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

    def watch(self, directory: str) -> None:
        if directory in self._watched:
            return
        self._watched.add(directory)
        if self._fd >= 0 and _libc is not None:
            mask = _IN_MODIFY | _IN_CREATE | _IN_MOVED_TO
            _libc.inotify_add_watch(self._fd, os.fsencode(directory), mask)

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
