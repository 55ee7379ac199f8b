"""A small TCP proxy for fault tests: cut every connection, or refuse new ones.

::

    with TcpProxy("127.0.0.1", 6379) as proxy:
        bus = polybus.connect(f"redis://127.0.0.1:{proxy.port}")
        ...
        proxy.cut()      # drop every open connection, like a broker restart
        proxy.block()    # refuse new connections (and cut open ones) until unblock()
"""

from __future__ import annotations

import selectors
import socket
import threading

__all__ = ["TcpProxy"]


class TcpProxy:
    """Forward ``127.0.0.1:port`` to ``upstream``; one thread, non-blocking sockets."""

    def __init__(self, host: str, port: int, *, listen_port: int = 0) -> None:
        self.upstream = (host, port)
        self._listener = socket.create_server(("127.0.0.1", listen_port))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._peers: dict[socket.socket, socket.socket] = {}
        self._lock = threading.Lock()
        self._blocked = False
        self._cut = False
        self._stop = False
        self.connections = 0  #: connections accepted so far
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self._thread.start()

    def cut(self) -> None:
        """Close every open connection (both sides); new ones are accepted."""
        with self._lock:
            self._cut = True

    def block(self) -> None:
        """Cut open connections and refuse new ones until :meth:`unblock`."""
        with self._lock:
            self._blocked = self._cut = True

    def unblock(self) -> None:
        with self._lock:
            self._blocked = False

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self._close_all()
        self._selector.close()
        self._listener.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _close_all(self) -> None:
        for sock in list(self._peers):
            self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        peer = self._peers.pop(sock, None)
        for s in (sock, peer):
            if s is None:
                continue
            self._peers.pop(s, None)
            try:
                self._selector.unregister(s)
            except (KeyError, ValueError):
                pass
            s.close()

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        if self._blocked:
            client.close()
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=2)
        except OSError:
            client.close()
            return
        self.connections += 1
        for s in (client, upstream):
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._selector.register(s, selectors.EVENT_READ)
        self._peers[client] = upstream
        self._peers[upstream] = client

    def _run(self) -> None:
        while not self._stop:
            with self._lock:
                if self._cut:
                    self._cut = False
                    self._close_all()
            for key, _ in self._selector.select(timeout=0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._listener:
                    self._accept()
                    continue
                peer = self._peers.get(sock)
                if peer is None:
                    continue
                try:
                    data = sock.recv(65536)
                    if data:
                        peer.settimeout(5.0)  # backpressure: wait for the slow side, not forever
                        peer.sendall(data)
                        peer.setblocking(False)
                        continue
                except OSError:
                    pass
                self._drop(sock)
