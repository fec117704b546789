"""An OpenAI-compatible HTTP API over one Session (`edgevlm serve`): POST /v1/chat/completions (images as data URLs
or local paths, optional SSE streaming), GET /v1/models, GET /health. Standard library only.

One session serves every request, one at a time (llama.cpp's context is not thread-safe); that is also what makes
the KV cache pay: a follow-up question about the same image restores the image prefix instead of re-encoding it."""
from __future__ import annotations

import base64
import binascii
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

from .errors import BadInputError, EdgeVLMError

MAX_BODY_BYTES = 64 * 2**20  # a few large base64 images


def parse_messages(body: dict) -> tuple[list[dict], list[Any]]:
    """OpenAI chat messages -> the session's messages ({"type": "image"} / {"type": "text"} items) and the images
    (decoded bytes from data URLs, or local paths) in order."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadInputError("'messages' must be a non-empty list of {role, content} objects")
    out, images = [], []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "user", "assistant"):
            raise BadInputError(f"messages[{i}].role must be system, user or assistant, got {role!r}")
        content = message.get("content")
        items: list[dict] = []
        if isinstance(content, str):
            items.append({"type": "text", "text": content})
        elif isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    items.append({"type": "text", "text": str(part.get("text", ""))})
                elif kind == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    images.append(image_source(str(url or "")))
                    items.append({"type": "image"})
                else:
                    raise BadInputError(f"messages[{i}] has a content part of type {kind!r}; use 'text' or 'image_url'")
        else:
            raise BadInputError(f"messages[{i}].content must be a string or a list of parts")
        if role == "system":  # templates differ in system support; fold it into the first user turn's text
            items = [{"type": "text", "text": "".join(x.get("text", "") for x in items) + "\n"}]
            role = "user"
        out.append({"role": role, "content": items})
    merged: list[dict] = []
    for message in out:  # a system turn becomes the start of the user turn after it
        if merged and merged[-1]["role"] == message["role"] == "user":
            merged[-1]["content"] = merged[-1]["content"] + message["content"]
        else:
            merged.append(message)
    return merged, images


def image_source(url: str):
    """data:image/...;base64,... -> bytes; file:///path or a plain path -> the path. Remote URLs are refused: an
    edge server should not fetch from the network on a client's behalf."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header or not payload:
            raise BadInputError("an image data URL must be base64: data:image/png;base64,...")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise BadInputError("the image data URL is not valid base64") from None
    if url.startswith(("http://", "https://")):
        raise BadInputError("remote image URLs are not fetched; send the image as a data URL (base64) or a local path")
    return url.removeprefix("file://")


def sampling_options(body: dict) -> dict:
    try:
        options: dict[str, Any] = {"max_tokens": int(body.get("max_tokens") or body.get("max_completion_tokens") or 256)}
        if body.get("temperature") is not None:
            options["temperature"] = float(body["temperature"])
        if body.get("top_p") is not None:
            options["top_p"] = float(body["top_p"])
        if body.get("seed") is not None:
            options["seed"] = int(body["seed"])
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadInputError(f"max_tokens, temperature, top_p and seed must be numbers ({exc})") from None
    from .runtimes.sampling import SamplingConfig

    try:
        SamplingConfig(options.get("temperature", 0.0), 0, options.get("top_p", 1.0), 1.0, options.get("seed"))
    except ValueError as exc:
        raise BadInputError(f"{exc}; fix the sampling options") from None
    return options


class ChatService:
    """The session behind the API, with the lock that serialises requests."""

    def __init__(self, session, model_name: str):
        self.session, self.model_name = session, model_name
        self.lock = threading.Lock()

    def complete(self, body: dict) -> Iterator:
        """Deltas of the answer, the last one carrying the whole GenerationResult. Call under lock."""
        messages, images = parse_messages(body)
        self.session.forget_sequence()  # a new request: only the caches (embeddings, prefixes) carry over
        return self.session.stream_conversation(messages, images, **sampling_options(body))

    def response(self, result, completion_id: str) -> dict:
        t = result.timings
        return {
            "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": self.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": "length" if result.finish_reason != "stop" else "stop"}],
            "usage": {"prompt_tokens": t["n_prompt_tokens"], "completion_tokens": t["n_new_tokens"],
                      "total_tokens": t["n_prompt_tokens"] + t["n_new_tokens"]},
            "timings": t,
        }


def make_handler(service: ChatService):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # quiet: the CLI prints one line per request itself
            pass

        def _json(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
            self._json(status, {"error": {"message": message, "type": kind}})

        def do_GET(self):
            if self.path == "/health":
                self._json(200, {"status": "ok"})
            elif self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": service.model_name, "object": "model",
                                                             "owned_by": "edgevlm"}]})
            else:
                self._error(404, f"no route {self.path}; try POST /v1/chat/completions", "not_found")

        def do_POST(self):
            if self.path != "/v1/chat/completions":
                self._error(404, f"no route {self.path}; try POST /v1/chat/completions", "not_found")
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                self._error(413, f"the request body is {length} bytes; the limit is {MAX_BODY_BYTES}")
                return
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("not an object")
            except ValueError as exc:
                self._error(400, f"the request body is not a JSON object ({exc})")
                return
            completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
            with service.lock:
                try:
                    deltas = service.complete(body)
                    if body.get("stream"):
                        self._stream(deltas, completion_id)
                    else:
                        result = [d.result for d in deltas][-1]
                        self._json(200, service.response(result, completion_id))
                except EdgeVLMError as exc:
                    self._error(400, str(exc))
                except Exception as exc:  # noqa: BLE001 (a server answers, it does not die)
                    self._error(500, f"{type(exc).__name__}: {exc}", "server_error")

        def _stream(self, deltas: Iterator, completion_id: str) -> None:
            # the first delta is computed before the headers go out, so bad input still gets a plain 400
            first = next(deltas, None)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True

            def event(delta: dict, finish: str | None = None) -> None:
                chunk = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
                         "model": service.model_name, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()

            event({"role": "assistant"})
            result = None
            try:
                delta = first
                while delta is not None:
                    if delta.result is not None:
                        result = delta.result
                    elif delta.text:
                        event({"content": delta.text})
                    delta = next(deltas, None)
            except Exception as exc:  # noqa: BLE001 (headers are out: report in the stream)
                self.wfile.write(f"data: {json.dumps({'error': {'message': str(exc), 'type': 'server_error'}})}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
                return
            event({}, "stop" if result.finish_reason == "stop" else "length")
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

    return Handler


def make_server(session, model_name: str, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    return ThreadingHTTPServer((host, port), make_handler(ChatService(session, model_name)))
