"""The chat page at ``/`` in a real browser (Debian's chromium driven by playwright).

The served engine is the tiny model with a logits processor that forces a chosen reply, so the test decides
what the "model" says (a ``<script>``, markdown, a long answer to stop mid-stream).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import _infer_helpers as H
import httpx
import pytest
from _serve_helpers import Forced

from llmlab.infer import LLM
from llmlab.serve.openai_api import ServedModel
from llmlab.serve.server import BackgroundServer

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian chromium (/usr/bin/chromium) is not installed"
)
one_thread = pytest.fixture(scope="module", autouse=True)(H.one_thread)


@pytest.fixture(scope="module")
def served():
    llm = LLM.from_model(H.model(max_seq_len=2048), H.tokenizer(), enable_prefix_caching=True)
    forced = Forced(llm)
    with BackgroundServer([ServedModel("tiny", llm, root="tiny")]) as url:
        yield url, forced


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


def metric(url: str, pattern: str) -> float:
    m = re.search(rf"^{pattern} (\S+)$", httpx.get(url + "/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0


def test_page_is_served_with_a_strict_csp(served):
    r = httpx.get(served[0] + "/")
    assert r.status_code == 200 and "script-src 'self';" in r.headers["content-security-policy"]
    assert httpx.get(served[0] + "/ui/chat.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(served[0] + "/ui/nope.js").status_code == 404


def test_chat_page_streams_stops_and_never_runs_model_html(served, browser, tmp_path):
    url, forced = served
    # bypass_csp: playwright's wait_for_function evaluates strings, which the page's CSP forbids. It also
    # proves the page itself never runs model HTML, without the CSP's help (the CSP is checked separately).
    page = browser.new_context(bypass_csp=True).new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")

    # 1. type a prompt, Enter sends, the streamed answer appears with a TTFT readout
    forced.reply = "Here is **bold** and `code`:\n\n```python\nprint('hi')\n```\n- one\n- two"
    page.fill("#prompt", "Say hello")
    page.press("#prompt", "Enter")
    page.wait_for_function(
        "document.querySelectorAll('.msg.assistant').length === 1 && !document.querySelector('#send').disabled"
    )
    bubble = page.locator(".msg.assistant").last
    assert bubble.locator("strong").inner_text() == "bold"
    assert bubble.locator("pre code").inner_text() == "print('hi')"
    assert bubble.locator("li").count() == 2
    assert "TTFT" in page.inner_text("#stats")

    # 2. model output with HTML is shown as text and never executed
    forced.reply = "<script>window.__pwned = 1</script><img src=x onerror='window.__pwned = 2'> done"
    page.fill("#prompt", "Be evil")
    page.press("#prompt", "Enter")
    page.wait_for_function(
        "document.querySelectorAll('.msg.assistant').length === 2 && !document.querySelector('#send').disabled"
    )
    evil = page.locator(".msg.assistant").last
    assert "<script>window.__pwned = 1</script>" in evil.inner_text()
    assert evil.locator("script, img").count() == 0
    time.sleep(0.2)
    assert page.evaluate("window.__pwned") is None

    # 3. stop mid-stream (Esc): the server aborts the sequence and frees its KV blocks
    aborted = metric(url, r'llmlab:request_success_total\{finished_reason="abort"\}')
    forced.reply = "word " * 1500
    page.click("#toggle-settings")
    page.fill("#max_tokens", "2000")
    page.fill("#prompt", "Talk a lot")
    page.press("#prompt", "Enter")
    page.wait_for_function("(document.querySelectorAll('.msg.assistant')[2]?.textContent || '').length > 20")
    page.keyboard.press("Escape")
    deadline = time.monotonic() + 10
    while (
        metric(url, r'llmlab:kv_cache_blocks_used\{model_name="tiny"\}') > 0 and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert metric(url, r'llmlab:kv_cache_blocks_used\{model_name="tiny"\}') == 0
    assert metric(url, r'llmlab:request_success_total\{finished_reason="abort"\}') == aborted + 1
    page.wait_for_function("!document.querySelector('#send').disabled")
    assert len(page.locator(".msg.assistant").last.inner_text()) < len(forced.reply)

    # 4. conversations persist in localStorage across a reload
    page.reload()
    assert page.locator(".msg.user").count() == 3
    shot = tmp_path / "serve_chat.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    assert not errors, errors

    phone = browser.new_page(viewport={"width": 390, "height": 740}, color_scheme="dark")
    phone.goto(url + "/")
    phone.screenshot(path=str(tmp_path / "serve_chat_phone_dark.png"))
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390
    print(f"screenshot: {tmp_path / 'serve_chat_phone_dark.png'}")


def test_chat_page_asks_for_the_api_key_once_and_picks_models(browser):
    llm = LLM.from_model(H.model(max_seq_len=512), H.tokenizer())
    Forced(llm).reply = "Keyed answer."
    other = LLM.from_model(H.model(seed=1, max_seq_len=512), H.tokenizer())
    Forced(other).reply = "Other model."
    models = [ServedModel("tiny", llm, root="tiny"), ServedModel("tiny-b", other, root="tiny-b")]
    with BackgroundServer(models, api_key="k3y") as url:
        page = browser.new_context(bypass_csp=True).new_page()
        asked: list[str] = []

        def answer(dialog):
            asked.append(dialog.message)
            dialog.accept("k3y")

        page.on("dialog", answer)
        page.goto(url + "/")
        page.wait_for_function("document.querySelectorAll('#model option').length === 2")
        assert page.is_visible("#model")  # several models: the picker shows
        page.select_option("#model", "tiny-b")
        page.fill("#prompt", "Hi")
        page.press("#prompt", "Enter")
        page.wait_for_function(
            "(document.querySelector('.msg.assistant')?.textContent || '').includes('Other model.')"
        )
        page.reload()
        page.fill("#prompt", "Again")
        page.press("#prompt", "Enter")
        page.wait_for_function("document.querySelectorAll('.msg.assistant').length === 2")
        assert len(asked) == 1 and "API key" in asked[0]  # asked once, then kept
