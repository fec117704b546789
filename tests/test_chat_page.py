"""The chat page at `/`, driven in a real headless browser (Debian's Chromium through Playwright): attach an image,
ask, see the streamed answer equal the API's answer for the same conversation, ask a follow-up, start over. A
screenshot is saved as a test artifact (test-artifacts/chat-page.png, or $EDGEVLM_TEST_ARTIFACTS)."""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import threading
import urllib.request
from pathlib import Path

import pytest

import edgevlm
from edgevlm.serve import ServerOptions, make_server

QUESTION = "What colour is the circle?"
FOLLOW_UP = "And how many shapes are there?"


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("Chromium is not installed (scripts/setup-venv.sh installs Debian's chromium)")
    return path


def ask_api(base: str, messages: list[dict]) -> str:
    body = json.dumps({"messages": messages, "max_tokens": 256}).encode()
    request = urllib.request.Request(f"{base}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["choices"][0]["message"]["content"]


def test_chat_page_streams_the_apis_answer_in_a_real_browser(bundles, images, tmp_path):
    from playwright.sync_api import sync_playwright

    executable = chromium()
    session = edgevlm.load(bundles["llava-clip"], encoder="onnx:fp32", decoder="gguf:f32", threads=1)
    server = make_server(session, "tiny-llava", port=0, options=ServerOptions())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    picture = tmp_path / "scene.png"
    images["square"].save(picture)
    data_url = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()
    artifacts = Path(os.environ.get("EDGEVLM_TEST_ARTIFACTS", "test-artifacts"))
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
            # the page ships a strict CSP (no eval); the test reads its state with page.evaluate, which needs eval
            page = browser.new_page(viewport={"width": 1000, "height": 800}, bypass_csp=True)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(base + "/")
            page.wait_for_function("document.getElementById('model').textContent !== ''", timeout=30_000)
            assert page.locator("#model").inner_text() == "· tiny-llava"
            page.set_input_files("#file", str(picture))
            page.wait_for_function("state.image !== null", timeout=30_000)
            page.fill("#question", QUESTION)
            page.click("#send")
            page.wait_for_selector(".assistant[data-state=done]", timeout=120_000)
            messages = page.evaluate("state.messages")
            # the page sent exactly what an API client would, and shows what the API answers
            assert messages[0]["content"][0] == {"type": "image_url", "image_url": {"url": data_url}}
            expected = ask_api(base, [messages[0]])
            assert messages[1] == {"role": "assistant", "content": expected}
            shown = page.locator(".assistant").first.evaluate("e => e.firstChild ? e.firstChild.textContent : ''")
            assert shown == expected
            stats = page.locator(".assistant .stats").first.inner_text()
            assert "TTFT" in stats and "tok/s" in stats and "prefix cache hits" in stats
            # a follow-up in the same conversation, then the API's answer to the same three turns
            page.fill("#question", FOLLOW_UP)
            page.keyboard.press("Enter")
            page.wait_for_function("document.querySelectorAll('.assistant[data-state=done]').length === 2",
                                   timeout=120_000)
            messages = page.evaluate("state.messages")
            assert messages[3]["content"] == ask_api(base, messages[:3])
            artifacts.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(artifacts / "chat-page.png"), full_page=True)
            page.click("#new")
            assert page.evaluate("state.messages.length") == 0 and page.locator(".turn").count() == 0
            assert errors == []
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    assert (artifacts / "chat-page.png").stat().st_size > 5_000
