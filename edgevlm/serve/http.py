"""The HTTP side of `edgevlm serve` (standard library http.server, as mlx-lm does): routes, authentication, bodies,
whole and streamed (SSE) answers, timeouts and the connection cap. The handler only talks to the scheduler through
a job's queue; the server's options, service and scheduler hang off the server object."""
from __future__ import annotations

import hmac
import json
import queue
import select
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ..errors import BadInputError, EdgeVLMError
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .openai import ChatService, chunk, error_body, final_chunks, parse_body, stream_options
from .scheduler import Job, QueueFull, Scheduler
from .sequences import open_sequences

MAX_BODY_BYTES = 64 * 2**20  # a few large base64 images
MAX_PARALLEL = 64
DISCONNECT_POLL_S = 0.05  # how often a waiting handler checks that its client is still there
CHAT_PAGE = Path(__file__).parents[1] / "static" / "chat.html"
CHAT_PAGE_POLICY = "default-src 'self'; img-src 'self' data: blob:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def log(line: str) -> None:
    """One line on stderr, where `edgevlm serve` prints its own lines."""
    print(f"edgevlm serve: {line}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ServerOptions:
    capacity: int = 8  # requests that may wait beyond the --parallel answering ones; more get 429 at once
    request_timeout_s: float = 300.0
    socket_timeout_s: float = 30.0
    api_key: str | None = None
    allow_local_images: str | None = None
    max_connections: int = 64
    cache_dir: str | None = None  # the disk tier of the embedding and prefix caches (survives restarts)
    cache_dir_bytes: int = 2 << 30
    parallel: int = 1  # sequences decoded together (llama.cpp decoders only); 1 = one self-stepping slot
    public_metrics: bool = False  # /health and /metrics without the API key (a scraper on a trusted network)
    conversation_cache_bytes: int = 256 << 20  # evicted conversations' sequence states kept in RAM (0: none)
    # the image encoder's threads (what it was loaded with, --encode-threads): with --parallel N the decoder gives up
    # as many while an encode runs beside it (at least one left); None: half the decoder's threads (encode_worker.py);
    # 0: encodes on the engine thread, pausing every other slot's decode (the behaviour before issue 32)
    encode_threads: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.parallel <= MAX_PARALLEL:
            raise BadInputError(f"--parallel must be 1..{MAX_PARALLEL}, got {self.parallel}")
        if not 1 <= self.capacity <= 4096:
            raise BadInputError(f"--queue must be 1..4096, got {self.capacity}")
        for name in ("request_timeout_s", "socket_timeout_s"):
            value = getattr(self, name)
            if not 0.1 <= value <= 86400:  # NaN fails too
                raise BadInputError(f"{name.replace('_s', '').replace('_', '-')} must be 0.1..86400 seconds, got {value}")
        if not 1 <= self.max_connections <= 65536:
            raise BadInputError(f"--max-connections must be 1..65536, got {self.max_connections}")
        if self.allow_local_images is not None and not Path(self.allow_local_images).is_dir():
            raise BadInputError(f"--allow-local-images {self.allow_local_images}: not a folder")
        if not 0 <= self.conversation_cache_bytes <= 1 << 50:
            raise BadInputError(f"--conversation-cache-mb must be 0..{1 << 30}, "
                                f"got {self.conversation_cache_bytes >> 20}")
        if not 0 <= self.cache_dir_bytes <= 1 << 50:
            raise BadInputError(f"--cache-dir-mb must be 0..{1 << 30}, got {self.cache_dir_bytes >> 20}")
        if self.cache_dir is not None and Path(self.cache_dir).exists() and not Path(self.cache_dir).is_dir():
            raise BadInputError(f"--cache-dir {self.cache_dir}: exists and is not a folder")
        if self.api_key is not None and not self.api_key.strip():
            raise BadInputError("--api-key is empty")
        if self.encode_threads is not None and not 0 <= self.encode_threads <= 1024:
            raise BadInputError(f"--encode-threads must be 0..1024, got {self.encode_threads}")


class ClientGone(Exception):
    """The client closed or reset its connection: nothing can be answered any more."""


class Handler(BaseHTTPRequestHandler):
    """One connection's requests. Every request gets an answer unless its client is gone (then one log line), and
    no exception of a request reaches socketserver (which would print a traceback and drop the connection)."""

    protocol_version = "HTTP/1.1"
    server: "EdgeServer"

    def setup(self) -> None:
        self.timeout = self.server.options.socket_timeout_s  # a client that stalls loses its connection, not ours
        self.answered = False
        super().setup()

    def log_message(self, format, *args):  # quiet: one line per problem, not per request
        pass

    def do_GET(self) -> None:
        self._guarded(self._get)

    def do_POST(self) -> None:
        self._guarded(self._post)

    def _guarded(self, route) -> None:
        self.answered = False
        try:
            route()
        except ClientGone as exc:
            self.close_connection = True
            log(f"{self.client_address[0]}:{self.client_address[1]} {self.command} {self.path}: {exc}")
        except Exception as exc:  # noqa: BLE001 - a bug in one request is its 500, and the server keeps serving
            log(f"{self.command} {self.path}: {type(exc).__name__}: {exc}")
            self.close_connection = True
            if not self.answered:
                try:
                    self._error(500, f"internal error ({type(exc).__name__}); see the server's log", "server_error")
                except ClientGone:
                    pass

    # ---- writing ---------------------------------------------------------------------------------------------
    def _write(self, data: bytes = b"", end_headers: bool = False) -> None:
        """Send (the pending headers, then) `data`; a client that is gone raises ClientGone."""
        try:
            if end_headers:
                self.end_headers()
            if data:
                self.wfile.write(data)
        except OSError as exc:
            raise ClientGone(f"the client left while being answered ({type(exc).__name__})") from None

    def _send(self, status: int, data: bytes, content_type: str, headers: dict | None = None) -> None:
        self.answered = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if status >= 400 and status != 404:
            self.send_header("Connection", "close")
            self.close_connection = True
        self._write(data, end_headers=True)

    def _json(self, status: int, payload: dict, headers: dict | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", headers)

    def _error(self, status: int, message: str, kind: str | None = None, headers: dict | None = None) -> None:
        self.server.engine.metrics.count(str(status))
        self._json(status, error_body(status, message, kind), headers)

    def _authorized(self) -> bool:
        key = self.server.options.api_key
        if not key:
            return True
        given = self.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            return True
        self._error(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "authentication_error")
        return False

    # ---- routes ----------------------------------------------------------------------------------------------
    def _get(self) -> None:
        engine, path = self.server.engine, self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):  # the chat page: one self-contained file, no CDN; it sends the key itself
            self._send(200, CHAT_PAGE.read_bytes(), "text/html; charset=utf-8",
                       {"Content-Security-Policy": CHAT_PAGE_POLICY})
        elif path in ("/health", "/metrics", "/v1/models"):
            public = path != "/v1/models" and self.server.options.public_metrics
            if public or self._authorized():
                self._route_get(engine, path)
        else:
            self._error(404, f"no route {self.path}; try POST /v1/chat/completions", "not_found")

    def _route_get(self, engine: Scheduler, path: str) -> None:
        if path == "/health":
            alive, state = engine.is_alive(), engine.state()
            self._json(200 if alive else 503, {"status": "ok" if alive else "engine stopped",
                                               "queue_depth": state.queue_depth, "active_sequences": state.active,
                                               "slots": [slot.as_dict() for slot in state.slots],
                                               **({"last_error": engine.last_error} if engine.last_error else {})})
        elif path == "/metrics":
            self._send(200, engine.metrics.render(), METRICS_CONTENT_TYPE)
        else:
            name = self.server.service.model_name
            self._json(200, {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "edgevlm"}]})

    def _read_body(self) -> dict | None:
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            self._error(411, "a Content-Length header is required")
            return None
        if not raw_length.strip().isdigit():
            self._error(400, f"Content-Length must be a non-negative integer, got {raw_length[:40]!r}")
            return None
        length = int(raw_length)
        if length > MAX_BODY_BYTES:
            self._error(413, f"the request body is {length} bytes; the limit is {MAX_BODY_BYTES}")
            return None
        try:
            raw = self.rfile.read(length)
        except TimeoutError:
            self._error(408, f"the request body did not arrive within {self.server.options.socket_timeout_s:.0f} s")
            return None
        except OSError as exc:
            raise ClientGone(f"the client left while sending its body ({type(exc).__name__})") from None
        if len(raw) < length:
            self._error(400, f"the request body ended after {len(raw)} of {length} bytes")
            return None
        try:
            return parse_body(raw)
        except BadInputError as exc:
            self._error(400, str(exc))
            return None

    def _post(self) -> None:
        if self.path != "/v1/chat/completions":
            self._error(404, f"no route {self.path}; try POST /v1/chat/completions", "not_found")
            return
        received = time.monotonic()  # the request line and headers are in; the body is not read yet
        if not self._authorized():
            return
        body = self._read_body()
        if body is None:
            return
        try:
            include_usage = bool(stream_options(body).get("include_usage"))
        except EdgeVLMError as exc:
            self._error(400, str(exc))
            return
        engine = self.server.engine
        try:
            job = engine.submit(Job(body, received=received))
        except QueueFull:
            self._error(429, f"the server is busy ({engine.limit} requests answering or waiting: --parallel "
                             f"{len(engine.slots)} + --queue {engine.capacity}); retry shortly",
                        "rate_limit_error", {"Retry-After": "1"})
            return
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        try:
            if body.get("stream"):
                self._stream(job, completion_id, include_usage)
            else:
                self._whole(job, completion_id)
        except ClientGone:
            job.cancelled.set()  # the client left or stopped reading: free the engine at its next token
            engine.metrics.count("disconnected")
            raise

    # ---- answering -------------------------------------------------------------------------------------------
    def _next(self, job: Job):
        """The job's next event; a client that closed its connection meanwhile cancels it (ClientGone), noticed
        within DISCONNECT_POLL_S even when no text is being written to it. Past --request-timeout: a 504 event."""
        timeout = self.server.options.request_timeout_s
        deadline = job.submitted + timeout
        while True:
            if self._client_gone():
                job.cancelled.set()
                raise ClientGone("the client closed the connection while waiting for its answer")
            left = deadline - time.monotonic()
            try:
                return job.events.get(timeout=max(0.0, min(left, DISCONNECT_POLL_S)))
            except queue.Empty:
                if left <= DISCONNECT_POLL_S:
                    job.cancelled.set()
                    return ("error", 504, f"the request took longer than {timeout:.0f} s (--request-timeout); "
                                          "it was cancelled")

    def _client_gone(self) -> bool:
        """The peer closed its side: the socket reads as end-of-file (a pipelined next request is not that)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _whole(self, job: Job, completion_id: str) -> None:
        event, first_text = self._next(job), None
        while not isinstance(event, tuple):
            first_text = first_text or time.monotonic()
            event = self._next(job)
        if event[0] == "error":
            self._error(event[1], event[2])
            return
        event[1].timings.update(job.stages(first_text or time.monotonic()))
        self.server.engine.metrics.count("200")
        self._json(200, self.server.service.response(event[1], completion_id))

    def _stream(self, job: Job, completion_id: str, include_usage: bool) -> None:
        # the first event is awaited before the headers go out, so bad input still gets a plain 4xx
        event = self._next(job)
        first_text = None if isinstance(event, tuple) else time.monotonic()
        if isinstance(event, tuple) and event[0] == "error":
            self._error(event[1], event[2])
            return
        self.answered = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.close_connection = True
        model = self.server.service.model_name

        def send(event_chunk: dict) -> None:
            self._write(f"data: {json.dumps(event_chunk)}\n\n".encode())

        self._write(end_headers=True)
        send(chunk(completion_id, model, {"role": "assistant"}))
        while not isinstance(event, tuple):
            send(chunk(completion_id, model, {"content": event}))
            event = self._next(job)
        if event[0] == "error":  # headers are out: report in the stream
            send(error_body(event[1], event[2], "server_error"))
            self.server.engine.metrics.count(str(event[1]))
        else:
            event[1].timings.update(job.stages(first_text or time.monotonic()))
            for last in final_chunks(event[1], completion_id, model, include_usage):  # timings, usage
                send(last)
            self.server.engine.metrics.count("200")
        self._write(b"data: [DONE]\n\n")


class EdgeServer(ThreadingHTTPServer):
    """A thread per connection, at most `max_connections` at once (one more gets a 503 and is closed); `close`
    stops the engine too."""

    daemon_threads = True
    # the listen backlog: socketserver's default of 5 left a burst of clients beyond it waiting on SYN retries (1 s,
    # 3 s, ...) and, now and then, reset; the kernel caps it at net.core.somaxconn
    request_queue_size = 1024

    def __init__(self, address, service: ChatService, engine: Scheduler, options: ServerOptions):
        super().__init__(address, Handler)
        self.service, self.engine, self.options = service, engine, options
        self.connections = threading.BoundedSemaphore(options.max_connections)

    def process_request(self, request, client_address):
        if not self.connections.acquire(blocking=False):
            body = json.dumps(error_body(503, "too many connections; retry shortly", "rate_limit_error")).encode()
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                                b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()

    def handle_error(self, request, client_address):
        """A client that resets its connection while its request line or headers are read: one line, no traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log(f"{client_address[0]}:{client_address[1]}: the client left ({type(exc).__name__})")
        else:
            super().handle_error(request, client_address)

    def server_close(self):
        super().server_close()
        self.engine.stop()
        worker, parked = self.service.session.encode_worker, self.service.session.parked
        if worker is not None:
            worker.close()
        if parked.disk is not None:
            parked.disk.close()  # the states parked so far are on disk before the process goes


def make_server(session, model_name: str, host: str = "127.0.0.1", port: int = 8000,
                options: ServerOptions | None = None) -> EdgeServer:
    options = options or ServerOptions()
    allow = Path(options.allow_local_images) if options.allow_local_images else None
    if options.cache_dir:
        from ..runtimes.disk_cache import DiskCache

        session.disk_cache = DiskCache(options.cache_dir, options.cache_dir_bytes)  # before the slots share it
    from ..runtimes.parked import ParkedSequences

    disk_parked = None
    if session.disk_cache is not None and getattr(session.decoder, "state_signature", None):
        from ..runtimes.parked_disk import DiskParked

        disk_parked = DiskParked(session.disk_cache, session.decoder.state_signature, session.decoder.artifact_id)
    session.parked = ParkedSequences(options.conversation_cache_bytes, disk_parked)  # before the slots share it
    service = ChatService(session, model_name, allow)
    threads, session.encode_worker = None, None
    if options.parallel > 1 and options.encode_threads != 0:  # encodes beside the others' decodes: own worker, cores
        from ..runtimes.encode_worker import EncodeWorker, decode_threads_while_encoding, default_encode_threads

        session.encode_worker = EncodeWorker()  # before the slots share it
        decode = getattr(getattr(session.decoder, "context", None), "threads", None)
        if decode is not None:
            threads = (decode, decode_threads_while_encoding(decode, options.encode_threads
                                                             or default_encode_threads(decode)))
    engine = Scheduler(service, open_sequences(session, options.parallel), options.capacity, threads=threads)
    engine.start()
    return EdgeServer((host, port), service, engine, options)
