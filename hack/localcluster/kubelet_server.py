"""The node agent's slice of the kubelet HTTPS API: enough for ``kubectl logs``.

The API server reaches a kubelet at the Node's InternalIP and
``status.daemonEndpoints.kubeletEndpoint.Port``; the local cluster points it here with
``--kubelet-preferred-address-types=InternalIP`` and verifies this server's certificate
with the cluster CA, while this server requires the API server's client certificate
(signed by the same CA). Served: ``GET /healthz`` and ``GET /containerLogs/<ns>/<pod>/<container>``
with ``tailLines``, ``limitBytes`` and ``follow`` (``timestamps``, ``sinceSeconds`` and
``previous`` are ignored: the log file holds every run of the container). Everything
else (exec, attach, port-forward, metrics) answers 404.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from localcluster import podfiles

log = logging.getLogger("localcluster.node_agent")


def _tail(data: bytes, lines: int) -> bytes:
    if lines < 0:
        return data
    parts = data.splitlines(keepends=True)
    return b"".join(parts[-lines:]) if lines else b""


class KubeletServer:
    """A threaded HTTPS server on 127.0.0.1:``port``.

    ``running(namespace, pod, container)`` tells whether the container may still write
    (``follow`` stops once it returns False and the file is drained).
    """

    def __init__(self, port: int, cert: Path, key: Path, client_ca: Path, pods_dir: Path,
                 running: Callable[[str, str, str], bool], stopping: threading.Event):
        self.pods_dir, self.running, self.stopping = pods_dir, running, stopping
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt: str, *args: object) -> None:  # quiet: the agent log is for pods
                log.debug("kubelet api: " + fmt, *args)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                server.handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        ctx.load_verify_locations(str(client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="kubelet-api", daemon=True)

    def start(self) -> None:
        """Serve in a background thread."""
        self.thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.httpd.shutdown()
        self.httpd.server_close()

    def handle(self, req: BaseHTTPRequestHandler) -> None:
        """Route one GET request."""
        url = urllib.parse.urlsplit(req.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
        if parts == ["healthz"]:
            self._send(req, 200, b"ok")
        elif len(parts) == 4 and parts[0] == "containerLogs":
            self._logs(req, parts[1], parts[2], parts[3], query)
        else:
            self._send(req, 404, b"not supported by the local node agent\n")

    @staticmethod
    def _send(req: BaseHTTPRequestHandler, code: int, body: bytes) -> None:
        req.send_response(code)
        req.send_header("Content-Type", "text/plain")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)

    def _logs(self, req: BaseHTTPRequestHandler, ns: str, pod: str, container: str, query: dict[str, str]) -> None:
        try:
            path = podfiles.find_pod_dir(self.pods_dir, ns, pod) / f"{container}.log"
            data = path.read_bytes()
        except OSError:
            self._send(req, 404, f'container "{container}" in pod "{pod}" is not available\n'.encode())
            return
        data = _tail(data, int(query.get("tailLines", -1)))
        limit = int(query.get("limitBytes", 0)) or None
        if limit is not None:
            data = data[:limit]
        if query.get("follow") not in ("true", "1"):
            self._send(req, 200, data)
            return
        req.send_response(200)
        req.send_header("Content-Type", "text/plain")
        req.send_header("Transfer-Encoding", "chunked")
        req.end_headers()
        offset = path.stat().st_size
        sent = len(data)
        try:
            self._chunk(req, data)
            while not self.stopping.is_set() and (limit is None or sent < limit):
                with open(path, "rb") as f:
                    f.seek(offset)
                    more = f.read(64 * 1024)
                if more:
                    offset += len(more)
                    if limit is not None:
                        more = more[: limit - sent]
                    sent += len(more)
                    self._chunk(req, more)
                elif not self.running(ns, pod, container):
                    break
                else:
                    time.sleep(0.2)
            req.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass

    @staticmethod
    def _chunk(req: BaseHTTPRequestHandler, data: bytes) -> None:
        if data:
            req.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            req.wfile.flush()
