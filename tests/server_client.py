"""The HTTP client side of the server tests: a chat request by urllib, raw bytes over a socket, a server started on a
free 127.0.0.1 port and stopped, a metric read from /metrics, and a session wrapper that slows its deltas."""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

from edgevlm.serve import make_server

QUESTION = "What colour is the circle?"


def post(base: str, body: dict, raw: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(f"{base}/v1/chat/completions", data=raw if raw is not None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def user(data_url: str, text: str) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": text}]}


def start(session, **options):
    from edgevlm.serve import ServerOptions

    server = make_server(session, "tiny", port=0, options=ServerOptions(**options))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def stop(server):
    server.shutdown()
    server.server_close()


def raw_request(port: int, data: bytes, timeout: float = 30) -> tuple[int, bytes]:
    """Send bytes as they are (malformed headers included) and read the whole answer."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    answer = b"".join(chunks)
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0
    return status, answer.partition(b"\r\n\r\n")[2]


class SlowSession:
    """The real session, its text re-cut into one-character deltas with a pause before each (to hold the engine
    busy or cancel mid-answer: the tiny model's byte-level text arrives in a few large pieces); everything else is
    the session's own."""

    def __init__(self, session, pause_s: float, gate: threading.Event | None = None):
        self.session, self.pause_s, self.gate = session, pause_s, gate
        self.closed = threading.Event()
        self.yielded = 0

    def __getattr__(self, name):
        return getattr(self.session, name)

    def stream_conversation(self, *args, **kwargs):
        import time

        from edgevlm.runtimes.session import Delta

        deltas = self.session.stream_conversation(*args, **kwargs)
        try:
            for delta in deltas:
                for piece in (list(delta.text) if delta.result is None else [None]):
                    if self.gate is not None:
                        self.gate.wait(60)
                    time.sleep(self.pause_s)
                    self.yielded += 1
                    yield Delta(piece) if piece is not None else delta
        finally:
            deltas.close()
            self.closed.set()


def metric(base: str, name: str) -> float:
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as response:
        text = response.read().decode()
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
              or line.startswith(name + "{")]
    return sum(values)
