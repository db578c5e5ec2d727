"""A TCP link that can go silent: a network partition as a client sees it. Connections stay open
and nothing is refused or reset; the bytes just stop, so a blocking read waits forever."""

from __future__ import annotations

import socket
import threading
import time


class SilentLink:
    """Forwards 127.0.0.1:`port` to `target`, until it goes silent."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.silent = threading.Event()
        self.closed = threading.Event()
        self.marker, self.then = b"", 0
        self.sends_left: int | None = None  # client sends still let through once the marker passed
        self.sockets: list[socket.socket] = [self.server]
        threading.Thread(target=self._accept, daemon=True).start()

    def silence_after(self, marker: bytes, then: int = 0) -> None:
        """Go silent after the client's send that carries `marker` (plain text: sslmode=disable) and
        `then` more client sends. Those reach the server; nothing after them does, nor any reply."""
        self.marker, self.then = marker, then

    def close(self) -> None:
        self.closed.set()
        for sock in self.sockets:
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            threading.Thread(target=self._forward, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._forward, args=(upstream, client, False), daemon=True).start()

    def _forward(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                while self.silent.is_set() and not self.closed.is_set():
                    time.sleep(0.1)
                if from_client:
                    self._count(data)
                sink.sendall(data)
        except OSError:  # closed
            pass

    def _count(self, data: bytes) -> None:
        """Arm on the marker, count the client's sends after it, go silent on the last one."""
        if self.sends_left is None:
            if not (self.marker and self.marker in data):
                return
            self.sends_left = self.then
        else:
            self.sends_left -= 1
        if self.sends_left <= 0:
            self.silent.set()
