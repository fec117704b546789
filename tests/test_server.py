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
from edgevlm.serve import make_server
from server_client import QUESTION, SlowSession, metric, post, raw_request, start, stop, user


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
    # another request takes the live sequence; then the same image and question restore the cached image prefix
    assert post(base, {"messages": [{"role": "user", "content": "Something else entirely."}], "max_tokens": 2})[0] == 200
    again = json.loads(post(base, body)[1])
    assert again["choices"][0]["message"]["content"] == reference.text
    assert again["timings"]["prefix_cache_hits"] >= 1 and again["timings"]["encode_ms"] == 0
    # straight after it, the same request reuses the live sequence itself (no restore needed)
    third = json.loads(post(base, body)[1])
    assert third["choices"][0]["message"]["content"] == reference.text
    assert third["timings"]["n_reused_positions"] > 0 and third["timings"]["encode_ms"] == 0


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
    # local paths are refused unless the server was started with --allow-local-images DIR (tests below)
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/hostname"}},
                                                {"type": "text", "text": "hi"}]}]}, "local image paths are refused"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "one choice per request"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "'stop' must be"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, "max_tokens must be 1.."),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}},
                                                {"type": "text", "text": "hi"}]}]}, "not valid base64"),
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
            health = json.loads(response.read())  # the engine's state besides "ok" (queue, active sequences, slots)
            assert health == {"status": "ok", "queue_depth": 0, "active_sequences": 0,  # gguf: --parallel 2 by default
                              "slots": [{"id": i, "state": "idle", "n_past": 0} for i in range(2)]}
        assert "2 at once" in line
    finally:
        process.terminate()
        process.wait(timeout=30)


# --- issue 17: one engine, a bounded queue, safety, OpenAI compatibility ----------------------------------------------


@pytest.fixture(scope="module")
def session(bundles):  # two sequences: the tests serve it with --parallel 1 and 2
    return edgevlm.load(bundles["llava-clip"], encoder="onnx:fp32", decoder="gguf:f32", threads=1, n_seq=2)


def test_the_official_openai_client_streams_and_not(session, images, api):
    import openai

    _, _, data_url = api
    server, base = start(session, api_key="secret")
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="secret", max_retries=0, timeout=120)
        messages = [user(data_url, QUESTION)]
        whole = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=8, seed=1)
        reference = session.generate(images["small"], QUESTION, max_tokens=8)
        assert whole.choices[0].message.content == reference.text
        assert whole.usage.completion_tokens == len(reference.tokens)
        chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, stream=True,
                                                     stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == reference.text
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(reference.tokens)
        with pytest.raises(openai.BadRequestError, match="one choice per request"):
            client.chat.completions.create(model="tiny", messages=messages, n=2)
        assert [m.id for m in client.models.list()] == ["tiny"]
        with pytest.raises(openai.AuthenticationError, match="API key"):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        stop(server)


def test_stop_strings_cut_the_answer_in_the_whole_and_the_streamed_reply(session, images, api):
    base, _, data_url = api
    reference = session.generate(images["small"], QUESTION, max_tokens=16).text
    assert len(reference) >= 4, reference
    cut = reference[2:4]  # a stop string from inside the greedy answer
    expected = reference[:reference.find(cut)]
    body = {"messages": [user(data_url, QUESTION)], "max_tokens": 16, "stop": [cut, "never-appears"]}
    reply = json.loads(post(base, body)[1])
    assert reply["choices"][0]["message"]["content"] == expected
    assert reply["choices"][0]["finish_reason"] == "stop"
    raw = post(base, {**body, "stream": True})[1].decode()
    chunks = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected


def test_local_images_only_under_the_allowed_folder(session, images, tmp_path, api):
    base_api, _, data_url = api
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    images["small"].save(allowed / "small.png")
    images["small"].save(tmp_path / "outside.png")
    (allowed / "link.png").symlink_to(tmp_path / "outside.png")
    server, base = start(session, allow_local_images=str(allowed))
    try:
        by_data = json.loads(post(base_api, {"messages": [user(data_url, QUESTION)], "max_tokens": 6})[1])
        for url in (str(allowed / "small.png"), "file://" + str(allowed / "small.png"), "small.png"):
            status, raw = post(base, {"messages": [user(url, QUESTION)], "max_tokens": 6})
            assert status == 200, raw
            assert json.loads(raw)["choices"][0]["message"]["content"] == by_data["choices"][0]["message"]["content"]
        for url in (str(tmp_path / "outside.png"), str(allowed / ".." / "outside.png"), "../outside.png",
                    str(allowed / "link.png")):
            status, raw = post(base, {"messages": [user(url, QUESTION)], "max_tokens": 6})
            assert status == 400 and "outside the folder this server may read" in json.loads(raw)["error"]["message"]
    finally:
        stop(server)


def test_malformed_http_gets_a_4xx_and_the_server_keeps_serving(session, api):
    server, base = start(session, socket_timeout_s=1.0)
    port = server.server_address[1]
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    try:
        cases = [
            (head + b"Content-Length: abc\r\n\r\n{}", 400, b"Content-Length must be a non-negative integer"),
            (head + b"Content-Length: -5\r\n\r\n{}", 400, b"Content-Length must be a non-negative integer"),
            (head + b"\r\n", 411, b"Content-Length header is required"),
            (head + b"Content-Length: 999999999999\r\n\r\n", 413, b"the limit is"),
            (head + b"Content-Length: 50\r\n\r\n{\"messages\"", 408, b"did not arrive within 1 s"),
            (head + b"Content-Length: 4\r\n\r\n\xff\xfe\x00{", 400, b"not a JSON object"),
            (head + b"Content-Length: 2\r\n\r\n[]", 400, b"not a JSON object"),
        ]
        for data, status, needle in cases:
            got, body = raw_request(port, data)
            assert got == status and needle in body, (data, got, body)
        status, raw = post(base, {"messages": [user(api[2], QUESTION)], "max_tokens": 4})
        assert status == 200, raw
    finally:
        stop(server)


def test_a_full_queue_answers_429_at_once_and_a_disconnect_frees_the_engine(session, api):
    import socket
    import time

    _, _, data_url = api
    gate = threading.Event()
    slow = SlowSession(session, 0.05, gate)
    server, base = start(slow, capacity=1)
    body = json.dumps({"messages": [user(data_url, QUESTION)], "max_tokens": 40, "stream": True}).encode()
    try:
        # one request holds the engine (gated), one waits in the queue: a third is refused at once
        first = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30)
        first.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        for _ in range(100):
            if metric(base, "edgevlm_active_sequences") == 1:
                break
            time.sleep(0.05)
        waiting = threading.Thread(target=post, args=(base, {"messages": [user(data_url, QUESTION)], "max_tokens": 2}))
        waiting.start()
        for _ in range(100):
            if metric(base, "edgevlm_queue_depth") == 1:
                break
            time.sleep(0.05)
        started = time.monotonic()
        request = urllib.request.Request(f"{base}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as busy:
            urllib.request.urlopen(request, timeout=30)
        assert busy.value.code == 429 and busy.value.headers["Retry-After"] == "1"
        assert "busy" in json.loads(busy.value.read())["error"]["message"]
        assert time.monotonic() - started < 5  # refused, not queued behind the gated request
        # the first client reads one chunk and leaves: its answer stops within a step, the waiting one is served
        gate.set()
        assert first.recv(4096).startswith(b"HTTP/1.1 200")
        first.close()
        assert slow.closed.wait(30)
        waiting.join(60)
        for _ in range(100):
            if metric(base, "edgevlm_cancelled_total") + metric(base, 'edgevlm_requests_total{outcome="disconnected"}') >= 1:
                break
            time.sleep(0.05)
        assert metric(base, "edgevlm_cancelled_total") >= 1
        assert slow.yielded < 40  # stopped a few pieces after the client left, not at the end of its answer
        assert metric(base, "edgevlm_active_sequences") == 0
        with urllib.request.urlopen(f"{base}/health", timeout=30) as response:
            assert json.loads(response.read())["status"] == "ok"
    finally:
        gate.set()
        stop(server)


def test_32_concurrent_clients_get_the_answers_they_get_alone(session, images, api):
    """Mixed images, mixed streaming, greedy: every answer equals the same request served alone."""
    from concurrent.futures import ThreadPoolExecutor

    server, base = start(session, capacity=64)
    try:
        urls = {}
        for name in ("small", "wide", "tall", "square"):
            buffer = io.BytesIO()
            images[name].save(buffer, format="PNG")
            urls[name] = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        questions = [QUESTION, "How many shapes are there?"]
        cases = [(name, q, stream) for name in urls for q in questions for stream in (False, True)] * 2  # 32

        def ask(case):
            name, question, stream = case
            status, raw = post(base, {"messages": [user(urls[name], question)], "max_tokens": 6, "stream": stream})
            assert status == 200, raw
            if not stream:
                return json.loads(raw)["choices"][0]["message"]["content"]
            return "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "")
                           for line in raw.decode().splitlines() if line.startswith("data: {"))

        alone = {(n, q): ask((n, q, False)) for n in urls for q in questions}
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(ask, cases))
        assert answers == [alone[(n, q)] for n, q, _ in cases]
        assert metric(base, 'edgevlm_requests_total{outcome="200"}') == len(alone) + len(cases)
    finally:
        stop(server)


def test_a_burst_of_connections_waits_in_the_backlog_and_every_one_is_answered(session, api):
    """48 clients connect and send before the server accepts anyone: all connect at once (the listen backlog holds
    them; socketserver's default of 5 left the rest in SYN retries, and the 32-client test failed now and then with a
    reset) and every one gets its answer."""
    import socket

    server, clients, serving = make_server(session, "tiny", port=0), [], None
    try:
        for _ in range(48):
            client = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=5)
            client.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            clients.append(client)
        serving = threading.Thread(target=server.serve_forever, daemon=True)
        serving.start()
        answers = [client.recv(64) for client in clients]
        assert all(a.startswith(b"HTTP/1.1 200") for a in answers), answers
    finally:
        for client in clients:
            client.close()
        if serving is not None:  # shutdown() waits for serve_forever, which never ran if a connect failed
            server.shutdown()
        server.server_close()


@pytest.mark.parametrize("parallel", [1, 2])  # 2: what `edgevlm serve` runs by default on a GGUF decoder
def test_sequential_requests_do_not_grow_memory(session, api, parallel):
    """The 1,000-request run is a benchmark; here 150 after a warm-up, with the same per-request bound."""
    import psutil

    server, base = start(session, parallel=parallel)
    body = {"messages": [user(api[2], QUESTION)], "max_tokens": 4}
    try:
        for _ in range(20):
            assert post(base, body)[0] == 200
        before = psutil.Process().memory_info().rss
        for i in range(150):
            assert post(base, {**body, "stream": i % 2 == 1})[0] == 200
        grown = psutil.Process().memory_info().rss - before
        assert grown < 150 * 50_000, f"RSS grew {grown / 2**20:.1f} MiB over 150 requests"
    finally:
        stop(server)


def test_serve_refuses_bad_server_options_before_loading(bundles, tmp_path, capsys):
    from edgevlm.cli import main

    bundle = str(bundles["llava-clip"])
    for argv, needle in ((["--allow-local-images", str(tmp_path / "nope")], "not a folder"),
                         (["--queue", "0"], "--queue must be 1..4096"),
                         (["--request-timeout", "nan"], "request-timeout must be 0.1..86400"),
                         (["--port", "70000"], "--port must be 0..65535"),
                         (["--parallel", "0"], "--parallel must be 1..64")):
        assert main(["serve", bundle, *argv]) == 2
        assert needle in capsys.readouterr().err


def test_stop_filter_holds_back_only_what_could_start_a_stop_string():
    from edgevlm.runtimes.stop import StopFilter

    f = StopFilter(["END", "xy"])
    assert f.feed("abcE") == "abc"  # "E" may begin "END"
    assert f.feed("Nope x") == "ENope "  # "EN" + "ope": no stop; "x" may begin "xy"
    assert f.feed("z E") == "xz "
    assert f.feed("ND and more") == "" and f.stopped
    assert f.sent == "abcENope xz " and f.feed("later") == "" and f.flush() == ""
    g = StopFilter(["##"])
    assert g.feed("a#") == "a" and g.flush() == "#" and g.sent == "a#" and not g.stopped


def test_disk_cache_survives_a_restart_and_ignores_bad_files(bundles, api, tmp_path):
    """Restart the server, ask about the same image: no encoder run, no image prefill, same greedy answer; a
    truncated or foreign file is deleted, never loaded; a state of another decoder is never restored."""
    cache = tmp_path / "cache"
    body = {"messages": [user(api[2], QUESTION)], "max_tokens": 8}

    def serve_once(decoder: str = "gguf:f32") -> list[dict]:
        session = edgevlm.load(bundles["llava-clip"], encoder="onnx:fp32", decoder=decoder, threads=1)
        server, base = start(session, cache_dir=str(cache))
        try:
            return [json.loads(post(base, body)[1])]
        finally:
            stop(server)

    [cold] = serve_once()
    assert cold["timings"]["encode_ms"] > 0 and cold["timings"]["disk_cache_hits"] == 0
    files = sorted(cache.glob("*.evc"))
    assert len(files) == 2  # the image's embeddings and the image-prefix KV state
    [warm] = serve_once()  # a new process' worth of state: new session, new server, same folder
    assert warm["choices"][0]["message"]["content"] == cold["choices"][0]["message"]["content"]
    t = warm["timings"]
    assert t["encode_ms"] == 0 and t["prefix_cache_hits"] == 1 and t["disk_cache_hits"] == 1
    assert t["n_prefilled_positions"] < cold["timings"]["n_prefilled_positions"]
    # a q8_0 decoder never gets the f32 decoder's state (it does reuse the image embeddings)
    [other] = serve_once("gguf:q8_0")
    assert other["timings"]["prefix_cache_hits"] == 0 and other["timings"]["encode_ms"] == 0
    # damaged files: truncated, and another file's bytes under this name; both ignored and deleted
    for path in files:
        path.write_bytes(path.read_bytes()[:100])
    [after] = serve_once()
    assert after["choices"][0]["message"]["content"] == cold["choices"][0]["message"]["content"]
    assert after["timings"]["encode_ms"] > 0 and after["timings"]["disk_cache_hits"] == 0
    assert not any(p.exists() and p.stat().st_size == 100 for p in files)
    from edgevlm.runtimes.disk_cache import DiskCache

    disk = DiskCache(tmp_path / "unit", 1000)
    assert disk.put("ns", "a", b"x" * 400) and disk.put("ns", "b", b"y" * 400)
    assert disk.put("ns", "c", b"z" * 400)  # over the bound: the least recently used goes
    assert disk.get("ns", "a") is None and disk.get("ns", "c")[1] == b"z" * 400
    assert disk.get("other-namespace", "c") is None
    assert disk.put("ns", "d", b"d" * 100) and disk.put("ns", "e", b"e" * 100)
    disk._path("ns", "e").write_bytes(disk._path("ns", "d").read_bytes())  # another entry's file under e's name
    assert disk.get("ns", "e") is None and not disk._path("ns", "e").exists() and disk.get("ns", "d")[1] == b"d" * 100
    assert not disk.put("ns", "huge", b"q" * 2000)


def test_a_follow_up_turn_prefills_only_its_new_tokens(session, api):
    base, _, data_url = api
    server, base = start(session)
    try:
        first_body = {"messages": [user(data_url, QUESTION)], "max_tokens": 6}
        first = json.loads(post(base, first_body)[1])
        answer = first["choices"][0]["message"]["content"]
        follow = {"messages": [user(data_url, QUESTION), {"role": "assistant", "content": answer},
                               {"role": "user", "content": "And the shape?"}], "max_tokens": 6}
        second = json.loads(post(base, follow)[1])
        t = second["timings"]
        # the image, the first question and the answer are already in the sequence: only the new turn is prefilled
        assert t["n_reused_positions"] >= first["timings"]["n_prompt_tokens"]
        assert t["n_prefilled_positions"] == t["n_prompt_tokens"] - t["n_reused_positions"] < 40
        assert t["encode_ms"] == 0
        # and the answer is the one a fresh session gives the whole conversation
        session.clear_caches()
        session.forget_sequence()
        cold = json.loads(post(base, follow)[1])
        assert cold["timings"]["n_reused_positions"] == 0
        assert cold["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]
    finally:
        stop(server)
