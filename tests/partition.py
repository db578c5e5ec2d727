"""A TCP link that can go silent: a network partition as a client sees it. Connections stay open
and nothing is refused or reset; the bytes just stop, so a blocking read waits forever."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class SilentLink:
    """Forwards 127.0.0.1:`port` to `target`, until it goes silent: every connection, or with
    `new_connections_pass` only those open at that moment (a partition that dropped a middlebox's
    state: old connections hang, a reconnect works)."""

    def __init__(self, target: tuple[str, int], new_connections_pass: bool = False) -> None:
        self.target = target
        self.new_connections_pass = new_connections_pass
        self.opened = 0  # connections accepted so far
        self.silenced_below: int | None = None  # connections numbered below this are silent
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.silent = threading.Event()
        self.closed = threading.Event()
        self.marker, self.then, self.markers_left = b"", 0, 1
        self.sends_left: int | None = None  # client sends still let through once the marker passed
        self.sockets: list[socket.socket] = [self.server]
        threading.Thread(target=self._accept, daemon=True).start()

    def silence_after(self, marker: bytes, then: int = 0, occurrence: int = 1) -> None:
        """Go silent after the `occurrence`-th client send that carries `marker` (plain text:
        sslmode=disable) and `then` more client sends. Those reach the server; nothing after them
        does, nor any reply."""
        self.marker, self.then, self.markers_left = marker, then, occurrence

    def close(self) -> None:
        """End every connection as a link that came back would: both ends see it closed. (A
        socket another thread waits on in recv() is not ended by close() alone: shutdown first.)"""
        self.closed.set()
        for sock in self.sockets:
            with contextlib.suppress(OSError):  # not connected, or closed already
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:  # closed
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:  # the target is down (a test's teardown): refuse this one
                client.close()
                continue
            self.sockets += [client, upstream]
            if self.closed.is_set():  # close() ran meanwhile and may have missed these two
                client.close()
                upstream.close()
                return
            number, self.opened = self.opened, self.opened + 1
            for pair in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._forward, args=(*pair, number), daemon=True).start()

    def is_silent(self, connection: int) -> bool:
        if not self.silent.is_set() or self.closed.is_set():
            return False
        return self.silenced_below is None or connection < self.silenced_below

    def _forward(
        self, source: socket.socket, sink: socket.socket, from_client: bool, connection: int
    ) -> None:
        try:
            while data := source.recv(65536):
                while self.is_silent(connection):
                    time.sleep(0.1)
                if from_client:
                    self._count(data)
                sink.sendall(data)
        except OSError:  # closed
            pass
        finally:  # one side ended: so does the connection, as across a real link
            source.close()
            sink.close()

    def _count(self, data: bytes) -> None:
        """Arm on the marker, count the client's sends after it, go silent on the last one."""
        if self.sends_left is None:
            if not (self.marker and self.marker in data):
                return
            self.markers_left -= 1
            if self.markers_left > 0:
                return
            self.sends_left = self.then
        else:
            self.sends_left -= 1
        if self.sends_left <= 0 and not self.silent.is_set():
            if self.new_connections_pass:
                self.silenced_below = self.opened
            self.silent.set()
