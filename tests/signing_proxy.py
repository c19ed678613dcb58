"""
A loopback HTTP proxy that signs every request it forwards, as the gitlawb
remote helper does, so that plain C{git push http://...} can reach a node.

It keeps the request's framing: a chunked upload is forwarded chunked, so the
node sees what git sent (minus nothing but the added signature headers).
"""

from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from gitlawb.identity.keys import NodeKey
from gitlawb.identity.signatures import sign_request

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "host",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
}


class SigningProxy:
    """
    Forwards C{http://127.0.0.1:<port>/...} to C{upstream}, signing with
    C{key} (or not at all when C{key} is C{None}).
    """

    def __init__(self, upstream: str, key: NodeKey | None) -> None:
        self.upstream = urlsplit(upstream)
        self.key = key
        self.requests: list[tuple[str, str, int, bool]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                proxy._forward(self)

            def do_POST(self) -> None:
                proxy._forward(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> SigningProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _read_body(self, handler: BaseHTTPRequestHandler) -> tuple[bytes, bool]:
        if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(handler.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(handler.rfile.read(size))
                handler.rfile.readline()
            return b"".join(parts), True
        length = int(handler.headers.get("Content-Length", "0") or 0)
        return handler.rfile.read(length) if length else b"", False

    def _forward(self, handler: BaseHTTPRequestHandler) -> None:
        body, chunked = self._read_body(handler)
        headers = {
            k: v for k, v in handler.headers.items() if k.lower() not in _HOP_BY_HOP
        }
        if self.key is not None:
            headers.update(
                sign_request(
                    self.key, handler.command, handler.path, body, int(time.time())
                )
            )
        self.requests.append((handler.command, handler.path, len(body), chunked))
        connection = http.client.HTTPConnection(
            self.upstream.hostname, self.upstream.port, timeout=600
        )
        try:
            if chunked:
                pieces = [body[i : i + 65536] for i in range(0, len(body), 65536)]
                connection.request(
                    handler.command,
                    handler.path,
                    body=iter(pieces),
                    headers=headers,
                    encode_chunked=True,
                )
            else:
                connection.request(
                    handler.command, handler.path, body=body or None, headers=headers
                )
            response = connection.getresponse()
            handler.send_response(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in _HOP_BY_HOP:
                    handler.send_header(name, value)
            handler.send_header("Transfer-Encoding", "chunked")
            handler.end_headers()
            while chunk := response.read1(65536):
                handler.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            handler.wfile.write(b"0\r\n\r\n")
        finally:
            connection.close()
