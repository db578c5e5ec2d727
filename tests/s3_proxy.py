"""A counting proxy in front of the tests' S3 server: it forwards bytes both ways unchanged and
writes one line per HTTP request it sees go up, `"GET /bucket/key HTTP/1.1"`, so that a test can
count what Quarry asked the server for (the JuiceFS gateway keeps no request log of its own).

It reads only the client's side of each connection: the request head, then exactly the body the
head announces (Content-Length, or chunked), so requests on a kept-alive connection are told apart.
The server's replies are copied as they come. A request line is written before the request is
forwarded, so it is in the log before its reply can reach the client.

Run: python -m tests.s3_proxy LISTEN_PORT UPSTREAM_PORT LOG_FILE
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading

HEAD_LIMIT = 64 * 1024


class ClosedEarly(Exception):
    """The client closed its connection inside a request."""


class ClientReader:
    """The client's bytes, read as the request framing needs them; each read also goes upstream."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client, self.upstream, self.buffer = client, upstream, b""

    def fill(self) -> bool:
        data = self.client.recv(65536)
        if not data:
            return False
        self.buffer += data
        return True

    def head(self) -> bytes | None:
        """The next request's head (through its blank line), not yet sent; None at a clean end."""
        while b"\r\n\r\n" not in self.buffer:
            if len(self.buffer) > HEAD_LIMIT:
                raise ClosedEarly("request head too long")
            if not self.fill():
                if self.buffer:
                    raise ClosedEarly("closed inside a request head")
                return None
        end = self.buffer.index(b"\r\n\r\n") + 4
        head, self.buffer = self.buffer[:end], self.buffer[end:]
        return head

    def send(self, data: bytes) -> None:
        self.upstream.sendall(data)

    def forward(self, length: int) -> None:
        """Send exactly `length` more bytes of the body upstream."""
        while length > 0:
            if not self.buffer and not self.fill():
                raise ClosedEarly("closed inside a request body")
            part, self.buffer = self.buffer[:length], self.buffer[length:]
            self.send(part)
            length -= len(part)

    def forward_line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            if not self.fill():
                raise ClosedEarly("closed inside a chunked body")
        end = self.buffer.index(b"\r\n") + 2
        line, self.buffer = self.buffer[:end], self.buffer[end:]
        self.send(line)
        return line

    def forward_chunked(self) -> None:
        while True:
            size = int(self.forward_line().split(b";")[0].strip(), 16)
            if size == 0:
                while self.forward_line() != b"\r\n":  # trailers, then the blank line
                    pass
                return
            self.forward(size + 2)  # the chunk and its CRLF


def header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def relay_requests(reader: ClientReader, log_fd: int) -> None:
    while (head := reader.head()) is not None:
        request_line = head.split(b"\r\n", 1)[0]
        os.write(log_fd, b'"' + request_line + b'"\n')  # one write on an O_APPEND file: whole lines
        reader.send(head)
        if (header(head, b"transfer-encoding") or b"").lower().endswith(b"chunked"):
            reader.forward_chunked()
        else:
            reader.forward(int(header(head, b"content-length") or 0))


def copy(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        close_both(source, sink)


def close_both(*sockets: socket.socket) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def serve_connection(client: socket.socket, upstream_port: int, log_fd: int) -> None:
    try:
        upstream = socket.create_connection(("127.0.0.1", upstream_port))
    except OSError:
        client.close()
        return
    for sock in (client, upstream):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threading.Thread(target=copy, args=(upstream, client), daemon=True).start()
    try:
        relay_requests(ClientReader(client, upstream), log_fd)
    except (OSError, ClosedEarly, ValueError):
        pass
    finally:
        close_both(client, upstream)


def main(listen_port: int, upstream_port: int, log_path: str) -> None:
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    server = socket.create_server(("127.0.0.1", listen_port), backlog=256)
    while True:
        client, _ = server.accept()
        threading.Thread(target=serve_connection, args=(client, upstream_port, log_fd), daemon=True).start()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
