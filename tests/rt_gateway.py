"""A reverse proxy in front of the test's RT, as nginx or a load balancer would be: it forwards
every request to the real RT, and lets a test act between requests or lose RT's answer."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

# Hop-by-hop headers, and those requests already decoded: the proxy answers with its own.
_NOT_FORWARDED = {"connection", "content-encoding", "content-length", "host", "transfer-encoding"}


class RtGateway(ThreadingHTTPServer):
    """`on_request(method, path)` runs before each request is forwarded; when it returns a
    status, the request still reaches RT but the client gets that status instead of RT's answer
    (a gateway timing out while RT goes on)."""

    daemon_threads = True

    def __init__(self, rt_url: str, on_request: Callable[[str, str], int | None]):
        super().__init__(("127.0.0.1", 0), _Forward)
        self.rt_url, self.on_request = rt_url, on_request
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _Forward(BaseHTTPRequestHandler):
    server: RtGateway

    def log_message(self, *args):
        pass

    def _forward(self):
        status = self.server.on_request(self.command, self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _NOT_FORWARDED}
        answer = requests.request(
            self.command, self.server.rt_url + self.path, data=body, headers=headers, timeout=30
        )
        content = b"" if status else answer.content
        self.send_response(status or answer.status_code)
        for name, value in answer.headers.items():
            if not status and name.lower() not in _NOT_FORWARDED:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    do_GET = do_POST = do_PUT = _forward
