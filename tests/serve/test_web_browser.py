"""The chat page and the dashboard in a real browser (Playwright driving Debian's chromium)
against the shared `nanovllm serve` test server (bundled model, API key set).

Set NANOVLLM_SCREENSHOTS=DIR to also run test_screenshots, which writes the images of
docs/images/ (`NANOVLLM_SCREENSHOTS=docs/images pytest tests/serve/test_web_browser.py -k screenshots`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time

import httpx
import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("no chromium browser: install Debian's package (apt-get install -y chromium)", allow_module_level=True)

CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-gpu"]
SCREENSHOT_DIR = os.environ.get("NANOVLLM_SCREENSHOTS")
STATS = re.compile(r"^≈?\d+ tokens · [\d.,]+ tok/s · TTFT [\d.]+ m?s")
ANSWER_TIMEOUT_MS = 60_000
MARKDOWN_MARKER_CHARS = 3  # the longest inline marker the renderer consumes ("```")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Tab:
    """A page plus what it logged: console errors, uncaught exceptions, and the chat requests it sent."""

    def __init__(self, page):
        self.page = page
        self.errors: list[str] = []
        self.chat_bodies: list[dict] = []
        self.statuses: list[tuple[str, int]] = []
        page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        page.on("request", self._on_request)
        page.on("response", lambda r: self.statuses.append((r.url, r.status)))

    def _on_request(self, request):
        if request.url.endswith("/v1/chat/completions") and request.method == "POST":
            self.chat_bodies.append(json.loads(request.post_data))


@pytest.fixture
def open_tab(browser, server):
    """open_tab(path, key=True, **context options): a fresh browser context (the key pre-stored when asked)."""
    contexts = []

    def open_(path: str = "/", key: bool = True, **options) -> Tab:
        context = browser.new_context(**{"viewport": {"width": 1200, "height": 800}, **options})
        contexts.append(context)
        if key:
            context.add_init_script(f"sessionStorage.setItem('nanovllm.apiKey', {json.dumps(server.api_key)})")
        tab = Tab(context.new_page())
        tab.page.goto(server.url + path)
        return tab

    yield open_
    for context in contexts:
        context.close()


# Page predicates are always functions ("() => ..."): Playwright eval()s a bare expression
# in the page, which the pages' Content-Security-Policy (no unsafe-eval) refuses.


def wait_for_models(page, model: str) -> None:
    page.wait_for_function("m => [...document.querySelectorAll('#model option')].some(o => o.value === m)", arg=model)


def set_settings(page, system: str = "", temperature: str = "0", max_tokens: str = "") -> None:
    if page.locator("#settings").is_hidden():
        page.click("#toggle-settings")
    page.fill("#system", system)
    page.fill("#temperature", temperature)
    page.fill("#max_tokens", max_tokens)


def ask(page, question: str) -> None:
    page.fill("#prompt", question)
    page.press("#prompt", "Enter")


def last_answer(page):
    return page.locator("article.assistant").last


def test_chat_page_loads_without_console_errors(open_tab, server):
    tab = open_tab("/")
    wait_for_models(tab.page, server.model)
    assert tab.page.title() == "nanovllm chat"
    assert tab.page.locator("#key-dialog").get_attribute("open") is None
    assert tab.page.is_visible("#prompt") and tab.page.is_visible("#send")
    tab.page.goto(server.url + "/dashboard")
    tab.page.wait_for_function("() => document.querySelector('#m-gen-total').dataset.value !== undefined")
    assert tab.errors == []


def test_streamed_answer_grows_ends_and_the_conversation_is_kept(open_tab, server):
    tab = open_tab("/")
    page = tab.page
    wait_for_models(page, server.model)
    set_settings(page, system="You are a terse assistant.", temperature="0", max_tokens="24")
    ask(page, "Name three fruits.")
    answer = last_answer(page)
    lengths = []
    deadline = time.monotonic() + ANSWER_TIMEOUT_MS / 1000
    while answer.get_attribute("data-state") == "streaming" and time.monotonic() < deadline:
        lengths.append(len(answer.locator(".body").inner_text()))
        time.sleep(0.03)
    assert answer.get_attribute("data-state") == "done"
    first = answer.locator(".body").inner_text().strip()
    assert first
    grown = sorted(set(n for n in lengths if n > 0))
    assert len(grown) >= 3, f"the answer did not stream in pieces: lengths seen {lengths}"
    # Rendered as Markdown: a marker such as "1." or "**" turns into formatting once complete and
    # its characters leave the text, so a piece may shrink by a few; never by more (no reset).
    assert all(b >= a - MARKDOWN_MARKER_CHARS for a, b in zip(lengths, lengths[1:])), \
        f"the answer shrank while streaming: {lengths}"
    assert STATS.match(answer.locator(".meta").inner_text()), answer.locator(".meta").inner_text()

    body = tab.chat_bodies[0]
    assert body["stream"] is True and body["temperature"] == 0 and body["max_tokens"] == 24
    assert body["model"] == server.model
    assert body["messages"] == [{"role": "system", "content": "You are a terse assistant."},
                                {"role": "user", "content": "Name three fruits."}]

    ask(page, "And two vegetables?")
    page.wait_for_selector("article.assistant >> nth=1", state="attached")
    page.wait_for_function("() => document.querySelectorAll('article.assistant')[1].dataset.state !== 'streaming'",
                           timeout=ANSWER_TIMEOUT_MS)
    assert last_answer(page).get_attribute("data-state") == "done"
    history = tab.chat_bodies[1]["messages"]
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user"]
    stored = page.evaluate("JSON.parse(sessionStorage.getItem('nanovllm.chat.conversation'))")
    assert history[2]["content"] == stored[1]["content"] and stored[1]["content"].strip()

    page.reload()  # the conversation survives a reload of the tab
    page.wait_for_function("() => document.querySelectorAll('article.message').length === 4")
    assert page.locator("article.assistant").first.locator(".body").inner_text().strip() == first
    assert tab.errors == []


def test_stop_button_aborts_the_request_on_the_server(open_tab, server):
    tab = open_tab("/")
    page = tab.page
    wait_for_models(page, server.model)
    max_tokens = 400
    set_settings(page, temperature="0", max_tokens=str(max_tokens))
    before = server.wait_idle()
    ask(page, "Write a very long story about a dragon and a knight, with many chapters.")
    answer = last_answer(page)
    page.wait_for_function("() => document.querySelector('article.assistant .body').innerText.length > 20",
                           timeout=ANSWER_TIMEOUT_MS)
    assert server.metrics()["nanovllm:num_requests_running"] == 1
    page.click("#stop")
    page.wait_for_function("() => document.querySelector('article.assistant').dataset.state !== 'streaming'", timeout=5000)
    assert answer.get_attribute("data-state") == "stopped"
    assert "stopped" in answer.locator(".meta").inner_text()
    assert page.is_visible("#send") and page.is_hidden("#stop")
    # The engine dropped the request: nothing runs within seconds (the full answer would take
    # far longer on CPU), the KV blocks are free, and it never finished.
    after = server.wait_idle(timeout=10)
    assert after["nanovllm:num_requests_running"] == 0
    assert after["nanovllm:num_requests_waiting"] == 0
    assert after["nanovllm:kv_cache_usage_perc"] == 0
    assert after["nanovllm:generation_tokens_total"] - before["nanovllm:generation_tokens_total"] < max_tokens
    assert after["nanovllm:request_success_total"] == before["nanovllm:request_success_total"]
    assert tab.errors == []


HOSTILE = [
    "Here you go: <script>window.__xss = 1</script> and ",
    "<img src=x onerror=\"window.__xss = 2\"> plus a [link](javascript:window.__xss=3) ",
    "and a [real one](https://example.com/a?b=1).\n\n```html\n<script>window.__xss = 4</script>\n",
    "```\n\n**bold <b>not html</b>** <iframe src=\"/\"></iframe>",
]


def test_model_output_with_html_is_shown_as_text(open_tab, server):
    tab = open_tab("/")
    page = tab.page
    wait_for_models(page, server.model)
    events = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    events += [{"choices": [{"index": 0, "delta": {"content": piece}}]} for piece in HOSTILE]
    sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=sse))
    ask(page, "Say something dangerous.")
    page.wait_for_selector("article.assistant[data-state=done]")
    body = last_answer(page).locator(".body")
    text = body.inner_text()
    assert "<script>window.__xss = 1</script>" in text
    assert '<img src=x onerror="window.__xss = 2">' in text
    assert "<script>window.__xss = 4</script>" in body.locator("pre code").inner_text()
    assert "<b>not html</b>" in body.locator("strong").inner_text()
    assert body.locator("script, img, iframe, b").count() == 0
    assert [a.get_attribute("href") for a in body.locator("a").all()] == ["https://example.com/a?b=1"]
    assert page.evaluate("window.__xss") is None
    assert tab.errors == []


def test_markdown_renderer(open_tab, server):
    tab = open_tab("/")
    md = ("# Title\n\nSome *em*, **strong**, `code` and ~~gone~~.\n\n- one\n- two\n  - nested\n\n"
          "1. first\n2. second\n\n> quoted\n\n| a | b |\n|---|--:|\n| 1 | 2 |\n\n```py\nx = 1 < 2\n```\n\n---\n"
          "```\nunclosed fence while streaming")
    shape = tab.page.evaluate("""async (md) => {
        const { renderMarkdown } = await import('/ui/markdown.js');
        const root = document.createElement('div');
        renderMarkdown(md, root);
        return [...root.children].map(n => n.tagName + (n.className ? '.' + n.className : ''))
            .concat([root.querySelector('ul ul li').textContent, root.querySelector('td.align-right').textContent,
                     root.querySelector('code.language-py').textContent, root.querySelector('p').innerHTML,
                     root.querySelectorAll('.code-block')[1].querySelector('code').textContent]);
    }""", md)
    assert shape == ["H1", "P", "UL", "OL", "BLOCKQUOTE", "DIV.table-wrap", "DIV.code-block", "HR", "DIV.code-block",
                     "nested", "2", "x = 1 < 2",
                     "Some <em>em</em>, <strong>strong</strong>, <code>code</code> and <del>gone</del>.",
                     "unclosed fence while streaming"]


def test_prometheus_parsing_and_percentiles(open_tab, server):
    """The dashboard's parser and histogram_quantile, on an exposition written here."""
    text = "\n".join([
        '# HELP x:lat_seconds A histogram.', '# TYPE x:lat_seconds histogram',
        'x:lat_seconds_bucket{le="0.1",model_name="a \\"b\\""} 2.0', 'x:lat_seconds_bucket{le="0.5",model_name="a \\"b\\""} 6.0',
        'x:lat_seconds_bucket{le="1.0",model_name="a \\"b\\""} 8.0', 'x:lat_seconds_bucket{le="+Inf",model_name="a \\"b\\""} 10.0',
        'x:tokens_total{model_name="m",kind="p"} 5', 'x:tokens_total{model_name="m",kind="g"} 7', 'x:odd NaN', ''])
    got = open_tab("/").page.evaluate("""async (text) => {
        const p = await import('/ui/prom.js');
        const s = p.parsePrometheus(text);
        const h = p.histogram(s, 'x:lat_seconds');
        const older = {bounds: h.bounds, counts: [1, 2, 2, 2]};
        return {label: s.get('x:lat_seconds_bucket')[0].labels.model_name, total: p.total(s, 'x:tokens_total'),
                missing: p.total(s, 'x:nothing'), bounds: h.bounds.map(String),
                q: [0.5, 0.9, 0.99].map(q => p.quantile(q, h)),
                delta: p.histogramDelta(h, older).counts, dq: p.quantile(0.5, p.histogramDelta(h, older)),
                reset: p.histogramDelta(older, h).counts, none: p.quantile(0.5, p.histogramDelta(h, h))};
    }""", text)
    assert got["label"] == 'a "b"' and got["total"] == 12 and got["missing"] is None
    assert got["bounds"] == ["0.1", "0.5", "1", "Infinity"]
    # rank 5 of 10 lies in (0.1, 0.5] holding observations 3..6: 0.1 + 0.4 * (5 - 2) / 4
    assert got["q"][0] == pytest.approx(0.4)
    assert got["q"][1] == 1.0 and got["q"][2] == 1.0  # in the +Inf bucket: the largest finite bound
    assert got["delta"] == [1, 4, 6, 8]
    assert got["dq"] == pytest.approx(0.1 + 0.4 * (4 - 1) / 3)  # rank 4 of 8, 3 more in (0.1, 0.5]
    assert got["reset"] == [1, 2, 2, 2] and got["none"] is None  # a counter reset; no observations


def test_dashboard_tokens_counter_rises(open_tab, server):
    tab = open_tab("/dashboard", key=False)  # /metrics is open, like /health: no key needed
    page = tab.page
    page.wait_for_function("() => document.querySelector('#m-gen-total').dataset.value !== undefined")
    before = float(page.get_attribute("#m-gen-total", "data-value"))
    r = httpx.post(server.v1 + "/chat/completions", headers=server.headers, timeout=120, json={
        "messages": [{"role": "user", "content": "Count to five."}], "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200
    generated = r.json()["usage"]["completion_tokens"]
    page.wait_for_function("n => Number(document.querySelector('#m-gen-total').dataset.value) >= n",
                           arg=before + generated, timeout=10_000)
    assert page.inner_text("#m-ttft") != "–"  # the request's first token fell in the window
    assert "live" in page.inner_text("#live-text")
    assert page.locator("#key-dialog").get_attribute("open") is None
    assert tab.errors == []


def test_without_the_key_data_calls_are_refused_and_the_page_asks(open_tab, server):
    tab = open_tab("/", key=False)
    page = tab.page
    page.wait_for_selector("#key-dialog[open]")
    assert "needs an API key" in page.inner_text("#key-dialog .key-message")
    assert (server.url + "/v1/models", 401) in tab.statuses
    statuses = page.evaluate("""async () => [
        (await fetch('/v1/models')).status,
        (await fetch('/v1/chat/completions', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                             body: JSON.stringify({messages: [{role: 'user', content: 'hi'}]})})).status,
    ]""")
    assert statuses == [401, 401]
    page.fill("#key-dialog input", "sk-wrong")
    page.press("#key-dialog input", "Enter")
    page.wait_for_function("() => document.querySelector('#key-dialog .key-message').textContent.includes('refused')")
    assert page.locator("#key-dialog").get_attribute("open") is not None
    page.fill("#key-dialog input", server.api_key)
    page.click("#key-dialog button[value=save]")
    wait_for_models(page, server.model)
    assert page.evaluate("sessionStorage.getItem('nanovllm.apiKey')") == server.api_key
    assert server.api_key not in json.dumps(page.evaluate("({...localStorage})"))  # this tab only
    assert all("401" in e for e in tab.errors), tab.errors  # the browser logs each refused call, nothing else


def test_usable_at_phone_width(open_tab, server):
    phone = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}
    tab = open_tab("/", **phone)
    page = tab.page
    wait_for_models(page, server.model)
    overflow = "document.scrollingElement.scrollWidth - window.innerWidth"
    assert page.evaluate(overflow) <= 0
    for selector in ("#prompt", "#send", "#model", "#toggle-settings"):
        box = page.locator(selector).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, selector
    assert page.is_hidden("#settings")  # collapsed on a narrow screen, one tap away
    page.click("#toggle-settings")
    assert page.is_visible("#max_tokens")
    page.goto(server.url + "/dashboard")
    page.wait_for_function("() => document.querySelector('#m-gen-total').dataset.value !== undefined")
    assert page.evaluate(overflow) <= 0
    assert tab.errors == []


@pytest.mark.skipif(not SCREENSHOT_DIR, reason="set NANOVLLM_SCREENSHOTS=DIR to write the docs' screenshots")
def test_screenshots(open_tab, server):
    """The images of docs/images: a chat answer with code, and the dashboard under a little load."""
    os.makedirs(SCREENSHOT_DIR, exist_ok=True)
    tab = open_tab("/")
    page = tab.page
    wait_for_models(page, server.model)
    set_settings(page, system="You are a helpful assistant.", temperature="0", max_tokens="200")
    ask(page, "Write a Python function that reverses a string, with an example.")
    page.wait_for_selector("article.assistant[data-state=done]", timeout=120_000)
    page.evaluate("document.activeElement.blur()")
    page.screenshot(path=os.path.join(SCREENSHOT_DIR, "web-chat.png"))

    stop = threading.Event()

    def load(i: int) -> None:
        k = 0
        while not stop.is_set():
            httpx.post(server.v1 + "/chat/completions", headers=server.headers, timeout=120, json={
                "messages": [{"role": "system", "content": "You are a helpful assistant."},
                             {"role": "user", "content": f"Tell me fact number {k + 10 * i} about the sea."}],
                "max_tokens": 48})
            k += 1

    page.goto(server.url + "/dashboard")
    page.click(".window-picker button[data-window='60']")
    workers = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    try:
        time.sleep(45)
        page.screenshot(path=os.path.join(SCREENSHOT_DIR, "web-dashboard.png"), full_page=True)
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert tab.errors == []
