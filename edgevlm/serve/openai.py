"""OpenAI's chat-completions format, pure: request bodies -> the session's messages, images and options; results ->
response, chunk and error shapes. No sockets, no threads: every function here is testable on its own."""
from __future__ import annotations

import base64
import binascii
import json
import time
from pathlib import Path
from typing import Any, Iterator

from ..errors import BadInputError
from ..runtimes.video_prompt import VideoRequest

MAX_COMPLETION_TOKENS = 1 << 16
MAX_JSON_DEPTH = 64  # a chat request nests 6 deep; deeper is an attack on the parser, not a request


def parse_body(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> dict:
    """A request body -> its JSON object. Bad JSON, a non-object, or nesting deeper than `max_depth` is a
    BadInputError with a one-line message (json.loads itself raises RecursionError some 1,000 levels down)."""
    try:
        body = json.loads(raw or b"{}")
    except RecursionError:
        raise BadInputError(f"the request body nests JSON deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInputError(f"the request body is not a JSON object ({exc})") from None
    if not isinstance(body, dict):
        raise BadInputError("the request body is not a JSON object (not an object)")
    if json_depth(body, max_depth) > max_depth:
        raise BadInputError(f"the request body nests JSON deeper than {max_depth} levels")
    return body


def json_depth(value: Any, limit: int) -> int:
    """How deeply containers nest in `value` (a scalar is 0), walked without recursion and given up past `limit`."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, (dict, list)):
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_messages(body: dict, allow_local: Path | None = None) -> tuple[list[dict], list[Any]]:
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
                    images.append(image_source(str(url or ""), allow_local))
                    items.append({"type": "image"})
                elif kind == "video_url":  # llama-server's and vLLM's shape; its source rides with the images
                    url = part.get("video_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    images.append(VideoRequest(image_source(str(url or ""), allow_local, "video")))
                    items.append({"type": "video"})
                else:
                    raise BadInputError(f"messages[{i}] has a content part of type {kind!r}; use 'text', 'image_url' "
                                        "or 'video_url'")
        else:
            raise BadInputError(f"messages[{i}].content must be a string or a list of parts")
        if role == "system":  # templates differ in system support; fold it into the first user turn's text
            items = [{"type": "text", "text": "".join(x.get("text", "") for x in items) + "\n"}]
            role = "user"
        out.append({"role": role, "content": items})
    merged: list[dict] = []
    for message in out:  # a system turn becomes the start of the user turn after it
        if merged and merged[-1]["role"] == message["role"] == "user":
            # in place (the lists are this function's own): copying the growing list made a body of 50,000 user
            # turns take 6 s and a 64 MB one hours (found by benchmarks/fuzz.py)
            merged[-1]["content"].extend(message["content"])
        else:
            merged.append(message)
    return merged, images


def image_source(url: str, allow_local: Path | None = None, what: str = "image") -> bytes | str:
    """data:image/...;base64,... -> bytes. A local path (file:///path or a plain path) only under `allow_local`
    (`--allow-local-images DIR`), resolved with symlinks, so a client cannot make the server read any file the
    process can. Remote URLs are refused: an edge server should not fetch from the network on a client's behalf."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header or not payload:
            example = "data:video/mp4;base64,..." if what == "video" else "data:image/png;base64,..."
            raise BadInputError(f"{'a' if what == 'video' else 'an'} {what} data URL must be base64: {example}")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise BadInputError(f"the {what} data URL is not valid base64") from None
    if url.startswith(("http://", "https://")):
        raise BadInputError(f"remote {what} URLs are not fetched; send the {what} as a data URL (base64) or a local "
                            "path")
    if allow_local is None:
        raise BadInputError(f"local {what} paths are refused by this server; send the {what} as a data URL (base64), "
                            "or start it with --allow-local-images DIR")
    root = Path(allow_local).resolve()
    path = Path(url.removeprefix("file://")).expanduser()
    resolved = (root / path if not path.is_absolute() else path).resolve()
    if resolved != root and root not in resolved.parents:
        raise BadInputError(f"{what} path {url!r} is outside the folder this server may read ({root})")
    return str(resolved)


def sampling_options(body: dict) -> dict:
    """OpenAI's request fields -> the session's sampling options; `n` > 1 and malformed `stop` are refused."""
    n = body.get("n", 1)
    if n not in (None, 1):
        raise BadInputError(f"n={n!r}: this server returns one choice per request; send n=1 (or several requests)")
    try:
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        options: dict[str, Any] = {"max_tokens": 256 if limit is None else int(limit)}
        if body.get("temperature") is not None:
            options["temperature"] = float(body["temperature"])
        if body.get("top_p") is not None:
            options["top_p"] = float(body["top_p"])
        if body.get("seed") is not None:
            options["seed"] = int(body["seed"])
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadInputError(f"max_tokens, temperature, top_p and seed must be numbers ({exc})") from None
    if not 1 <= options["max_tokens"] <= MAX_COMPLETION_TOKENS:
        raise BadInputError(f"max_tokens must be 1..{MAX_COMPLETION_TOKENS}, got {options['max_tokens']}")
    from ..runtimes.sampling import SamplingConfig

    try:
        SamplingConfig(options.get("temperature", 0.0), 0, options.get("top_p", 1.0), 1.0, options.get("seed"))
    except ValueError as exc:
        raise BadInputError(f"{exc}; fix the sampling options") from None
    return options


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not 1 <= len(stop) <= 4 or not all(isinstance(x, str) and x for x in stop):
        raise BadInputError("'stop' must be a non-empty string or a list of 1-4 non-empty strings")
    return stop


def stream_options(body: dict) -> dict:
    """`stream_options` ({} when absent); anything but an object is refused."""
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadInputError("'stream_options' must be an object")
    return options or {}


class ChatService:
    """The session behind the API: a request body as the session's arguments, and its answer as a stream of deltas
    (the one-slot scheduler's work, and the fuzzers' way in without a socket)."""

    def __init__(self, session, model_name: str, allow_local_images: Path | None = None):
        self.session, self.model_name = session, model_name
        self.allow_local_images = allow_local_images

    def arguments(self, body: dict) -> tuple[list[dict], list, dict]:
        """The request body as the session's messages, images and options (bad input: BadInputError)."""
        messages, images = parse_messages(body, self.allow_local_images)
        options = sampling_options(body)
        videos = [x for x in images if isinstance(x, VideoRequest)]
        if videos:  # one video per request, and then no image (the families' processors take one or the other)
            if len(videos) > 1 or len(videos) != len(images):
                raise BadInputError(f"a request takes one video_url and no image_url parts, got {len(videos)} videos "
                                    f"and {len(images) - len(videos)} images")
            images, options["video"] = [], videos[0]
        stops = stop_strings(body)
        if stops:
            options["stop"] = stops
        return messages, images, options

    def complete(self, body: dict) -> Iterator:
        """Deltas of the answer, the last one carrying the whole GenerationResult."""
        messages, images, options = self.arguments(body)
        # the live sequence stays: a follow-up turn of the conversation it holds prefills only its new tokens; any
        # other request keeps the part it shares (system prompt, image) and the session truncates the rest
        return self.session.stream_conversation(messages, images, **options)

    def response(self, result, completion_id: str) -> dict:
        return completion(result, completion_id, self.model_name)


# ---- response shapes -----------------------------------------------------------------------------------------------
def finish_reason(result) -> str:
    return "stop" if result.finish_reason == "stop" else "length"


def usage(result) -> dict:
    t = result.timings
    return {"prompt_tokens": t["n_prompt_tokens"], "completion_tokens": t["n_new_tokens"],
            "total_tokens": t["n_prompt_tokens"] + t["n_new_tokens"]}


def completion(result, completion_id: str, model: str) -> dict:
    """A whole answer (`chat.completion`), with edgevlm's timings beside the usage."""
    return {
        "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                     "finish_reason": finish_reason(result)}],
        "usage": usage(result), "timings": result.timings,
    }


def chunk(completion_id: str, model: str, delta: dict | None, finish: str | None = None) -> dict:
    """A `chat.completion.chunk` with one choice carrying `delta`; with None, a chunk without choices (usage)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices}


def final_chunks(result, completion_id: str, model: str, include_usage: bool) -> list[dict]:
    """The stream's last chunks: the finish reason with the timings, then the usage chunk when asked for."""
    chunks = [{**chunk(completion_id, model, {}, finish_reason(result)), "timings": result.timings}]
    if include_usage:
        chunks.append({**chunk(completion_id, model, None), "usage": usage(result)})
    return chunks


def error_body(status: int, message: str, kind: str | None = None) -> dict:
    kind = kind or ("server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "code": status}}
