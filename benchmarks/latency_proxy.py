"""Object storage with a round trip's latency, on the loopback: an S3-compatible server (moto's server mode) behind
a proxy that holds every request a fixed time before forwarding it.

On the loopback a request costs well under a millisecond, so reading one tensor at a time looks as fast as reading
many at once; a real bucket answers each request after tens of milliseconds (the time to first byte). The proxy
adds that wait: each connection has its own thread, so requests in flight at once wait at once, as they would for a
bucket. It forwards the method, path, headers and body unchanged (the request stays signed for the server) and
streams the answer back. It counts the requests and the most it held at once (`peak`). `hold`, when set, names
requests that get no answer at all (an object that hangs), until the proxy stops.

`object_store(latency)` starts both and points botocore (hence s3fs) at the proxy through AWS_* environment
variables; the benchmark (`benchmarks/objectstore.py`) and the tests use it.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
CHUNK = 1 << 16
UPSTREAM_TIMEOUT_S = 60


class LatencyProxy:
    """Forwards HTTP requests from 127.0.0.1:<port> to `upstream` ("host:port") after `latency` seconds each."""

    def __init__(self, upstream: str, latency: float):
        self.upstream, self.latency = upstream, latency
        self.requests = self.peak = self._now = 0
        self._lock = threading.Lock()
        # a test's stalled object: hold(method, path) true -> no answer at all, until the proxy stops
        self.hold = None
        self.held = 0  # requests held so far
        # a test's lying object: misstate(method, path) -> bytes added to the Content-Length its answer declares (the
        # body sent as it is, then the connection closed); unranged(method, path) true -> its Range header dropped
        self.misstate = self.unranged = None
        self._stopping = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: a client's pooled connections stay open
            disable_nagle_algorithm = True  # headers and body go as separate writes: no wait for an ACK between

            def log_message(self, *args):
                pass

            def forward(self):
                proxy._enter()
                try:
                    time.sleep(proxy.latency)
                    if proxy.hold is not None and proxy.hold(self.command, self.path):
                        self.close_connection = True
                        with proxy._lock:
                            proxy.held += 1
                        proxy._stopping.wait(UPSTREAM_TIMEOUT_S)
                        return
                    self._forward()
                finally:
                    proxy._leave()

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = forward

            def _forward(self):
                body = self._body()
                upstream = http.client.HTTPConnection(proxy.upstream, timeout=UPSTREAM_TIMEOUT_S)
                try:
                    upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    unranged = proxy.unranged is not None and proxy.unranged(self.command, self.path)
                    for key, value in self.headers.items():
                        if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                            if not (unranged and key.lower() == "range"):
                                upstream.putheader(key, value)
                    if body or self.command in ("PUT", "POST"):
                        upstream.putheader("Content-Length", str(len(body)))
                    upstream.endheaders(body or None)
                    answer = upstream.getresponse()
                    self.send_response_only(answer.status, answer.reason)
                    length = answer.getheader("Content-Length")
                    extra = proxy.misstate(self.command, self.path) if proxy.misstate is not None else 0
                    for key, value in answer.getheaders():
                        if key.lower() == "content-length" and extra:
                            value = str(int(value) + extra)
                            self.close_connection = True
                        if key.lower() not in HOP_BY_HOP:
                            self.send_header(key, value)
                    if length is None and self.command != "HEAD":
                        self.close_connection = True  # the answer's end is where the connection closes
                        self.send_header("Connection", "close")
                    self.end_headers()
                    if self.command != "HEAD":
                        while chunk := answer.read(CHUNK):
                            self.wfile.write(chunk)
                finally:
                    upstream.close()

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    parts = []
                    while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline().strip():  # trailers, up to the blank line
                        pass
                    return b"".join(parts)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # socketserver's 5 drops connections opened at once (a 1 s SYN retry each)

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="latency-proxy", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def _enter(self):
        with self._lock:
            self.requests += 1
            self._now += 1
            self.peak = max(self.peak, self._now)

    def _leave(self):
        with self._lock:
            self._now -= 1

    def reset(self) -> None:
        """Count afresh (requests, peak)."""
        with self._lock:
            self.requests = self.peak = 0

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()


@contextlib.contextmanager
def object_store(latency: float, bucket: str):
    """(proxy, direct): a moto S3 server on 127.0.0.1 with `bucket` made, and a LatencyProxy in front of it.
    Inside, AWS_ENDPOINT_URL names the proxy (s3fs.S3FileSystem() goes through it); `direct` is an
    S3FileSystem talking to the server itself (to upload fixtures without waiting). The environment is restored."""
    import logging

    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    saved["AWS_ENDPOINT_URL"] = os.environ.get("AWS_ENDPOINT_URL")
    try:
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
        with LatencyProxy(f"{host}:{port}", latency) as proxy:
            direct = s3fs.S3FileSystem(endpoint_url=f"http://{host}:{port}", skip_instance_cache=True)
            direct.makedirs(bucket, exist_ok=True)
            os.environ["AWS_ENDPOINT_URL"] = proxy.url
            s3fs.S3FileSystem.clear_instance_cache()
            yield proxy, direct
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()
