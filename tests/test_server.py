"""`edgevlm serve`: the OpenAI-compatible API answers exactly what the session answers, streams the same text, keeps
the KV cache across requests, and turns bad requests into 400s with a clear message."""
from __future__ import annotations

import base64
import io
import json
import threading
import urllib.error
import urllib.request

import pytest

import edgevlm
from edgevlm.server import make_server

QUESTION = "What colour is the circle?"


@pytest.fixture(scope="module")
def api(bundles, images):
    session = edgevlm.load(bundles["llava-clip"], encoder="onnx:fp32", decoder="gguf:f32", threads=1)
    server = make_server(session, "tiny-llava:gguf:f32", port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    buffer = io.BytesIO()
    images["small"].save(buffer, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    yield f"http://127.0.0.1:{server.server_address[1]}", session, data_url
    server.shutdown()
    server.server_close()


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


def test_completion_equals_the_session_and_reuses_the_cache(api, images):
    base, session, data_url = api
    reference = session.generate(images["small"], QUESTION, max_tokens=8)  # the server is idle between requests
    body = {"model": "x", "messages": [user(data_url, QUESTION)], "max_tokens": 8}
    status, raw = post(base, body)
    assert status == 200, raw
    reply = json.loads(raw)
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["content"] == reference.text
    assert reply["usage"]["completion_tokens"] == len(reference.tokens)
    assert reply["choices"][0]["finish_reason"] == reference.finish_reason
    again = json.loads(post(base, body)[1])  # same image, same question: a new request restores the cached prefix
    assert again["choices"][0]["message"]["content"] == reference.text
    assert again["timings"]["prefix_cache_hits"] >= 1 and again["timings"]["encode_ms"] == 0


def test_streaming_sends_the_same_text(api):
    base, _, data_url = api
    body = {"messages": [user(data_url, QUESTION)], "max_tokens": 8}
    whole_reply = json.loads(post(base, body)[1])
    whole = whole_reply["choices"][0]["message"]["content"]
    status, raw = post(base, {**body, "stream": True})
    assert status == 200
    events = [line[len("data: "):] for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole
    expected = "length" if whole_reply["usage"]["completion_tokens"] == 8 else "stop"  # 8 = max_tokens
    assert chunks[-1]["choices"][0]["finish_reason"] == whole_reply["choices"][0]["finish_reason"] == expected


def test_multi_turn_conversation_matches_chat(api, images):
    base, session, data_url = api
    session.reset()
    first = session.chat(QUESTION, image=images["small"], max_tokens=6)
    second = session.chat("And the shape?", max_tokens=6)
    session.reset()
    messages = [user(data_url, QUESTION), {"role": "assistant", "content": first.text},
                {"role": "user", "content": "And the shape?"}]
    reply = json.loads(post(base, {"messages": messages, "max_tokens": 6})[1])
    assert reply["choices"][0]["message"]["content"] == second.text


@pytest.mark.parametrize("body,needle", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                                                {"type": "text", "text": "hi"}]}]}, "data URL"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, "must be numbers"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                                {"type": "text", "text": "hi"}]}]}, "not a valid or complete image"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/no/such.png"}},
                                                {"type": "text", "text": "hi"}]}]}, "image not found"),
])
def test_bad_requests_are_clear_400s(api, body, needle):
    status, raw = post(api[0], body)
    assert status == 400
    assert needle in json.loads(raw)["error"]["message"]


def test_routes_and_malformed_json(api):
    base = api[0]
    assert post(base, {}, raw=b"{not json")[0] == 400
    with urllib.request.urlopen(f"{base}/v1/models", timeout=30) as response:
        assert json.loads(response.read())["data"][0]["id"] == "tiny-llava:gguf:f32"
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"{base}/v2/nothing", timeout=30)
    assert missing.value.code == 404


def test_serve_command_starts_and_answers(bundles):
    import re
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-m", "edgevlm", "serve", str(bundles["llava-clip"]), "--port", "0",
                                "--threads", "1", "--decoder", "gguf:q8_0"], stderr=subprocess.PIPE, text=True)
    try:
        line = process.stderr.readline()
        match = re.search(r"http://[\d.]+:(\d+)/v1/chat/completions", line)
        assert match, line
        with urllib.request.urlopen(f"http://127.0.0.1:{match.group(1)}/health", timeout=60) as response:
            assert json.loads(response.read()) == {"status": "ok"}
    finally:
        process.terminate()
        process.wait(timeout=30)
