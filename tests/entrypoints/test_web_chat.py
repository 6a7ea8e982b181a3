"""The web chat page at `/`, tested for real: `tokenloom serve` in a subprocess (with an API key), plain HTTP checks
of what / and /ui/ answer, and Debian's Chromium driven headless through its chromedriver (selenium): the key
field, the model picker, streaming, the speed line, stop mid-reply, history across a reload."""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from test_server import start_serve

from tokenloom.entrypoints.server import WEB_DIR

KEY = "web-chat-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,900"]
CONTEXT = 8192
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def chat_model(tiny_llama, tmp_path_factory) -> Path:
    """tiny_llama made chat-ready: a word-level tokenizer ("▁w0".."▁w319", so replies read "w12 w7 ...") and a
    chat template, which it lacks. It declares no EOS token, so every reply runs to its max tokens (a random model
    may stop anywhere otherwise), and a longer context, so a reply streams for seconds and Stop meets it
    mid-stream."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    src, ref = tiny_llama
    path = tmp_path_factory.mktemp("tiny-chat")
    shutil.copy(src / "model.safetensors", path)
    config = json.loads((src / "config.json").read_text())
    config.update(bos_token_id=None, eos_token_id=None, max_position_embeddings=CONTEXT)
    (path / "config.json").write_text(json.dumps(config))
    vocab = {f"\u2581w{i}": i for i in range(ref.config.vocab_size)}  # every id one word: text.split() counts
    tok = Tokenizer(models.WordLevel(vocab, unk_token="\u2581w0"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.save(str(path / "tokenizer.json"))
    template = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return path


@pytest.fixture(scope="module")
def server(chat_model):
    proc, url = start_serve(str(chat_model), "--dtype", "float32", "--max-model-len", str(CONTEXT),
                            "--kv-cache-memory", "16MiB", "--api-key", KEY)
    try:
        model = httpx.get(url + "/v1/models", headers=AUTH, timeout=30).json()["data"][0]["id"]
        yield SimpleNamespace(url=url, model=model)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except Exception:  # noqa: BLE001
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        pytest.skip(f"the web chat browser test needs Debian's chromium and chromium-driver ({', '.join(missing)} "
                    "missing): apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager never runs (it would try to download a driver).
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _metric(url: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", headers=AUTH, timeout=30).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)


def _wait(what: str, fn, timeout: float = 60.0, every: float = 0.05):
    deadline = time.time() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


# ---- without a browser ------------------------------------------------------------------------------------
def test_page_files_are_shipped_and_self_contained():
    files = sorted(p.name for p in WEB_DIR.iterdir())
    assert {"index.html", "chat.js", "chat.css"} <= set(files)
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["tokenloom"]
    for name in files:  # a non-editable install must carry every file the page needs
        assert any(fnmatch.fnmatch(f"entrypoints/web/{name}", p) for p in patterns), name
    for name in ("index.html", "chat.js", "chat.css"):
        text = (WEB_DIR / name).read_text()
        assert not re.search(r"https?://", text), f"{name}: no network resources (no CDN, no fonts)"
        assert not re.search(r"\.(inner|outer)HTML\s*\+?=|insertAdjacentHTML|document\.write", text), name


def test_root_answers_browsers_and_probes(server):
    url = server.url
    page = httpx.get(url + "/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="ui/chat.js"' in page.text and page.headers["vary"] == "Accept"
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for headers in ({}, {"Accept": "*/*"}, {"Accept": "application/json"}):  # curl, Ollama clients, probes
        r = httpx.get(url + "/", headers=headers)
        assert (r.status_code, r.text) == (200, "tokenloom is running"), headers
        assert r.headers["content-type"].startswith("text/plain")
    assert httpx.head(url + "/").status_code == 200  # the ollama CLI's heartbeat
    # the page's files load without the key; the API still needs it
    for name, kind in [("chat.js", "javascript"), ("chat.css", "text/css")]:
        r = httpx.get(f"{url}/ui/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"], name
        assert r.content == (WEB_DIR / name).read_bytes()
    assert httpx.get(url + "/ui/missing.js").status_code == 404
    assert httpx.get(url + "/v1/models").status_code == 401
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    assert httpx.post(url + "/v1/chat/completions", json=chat).status_code == 401
    assert httpx.post(url + "/v1/chat/completions", json=chat, headers=AUTH, timeout=60).status_code == 200
    doc = httpx.get(url + "/openapi.json", headers=AUTH).json()
    assert not [p for p in doc["paths"] if p.startswith("/ui")]
    assert "security" not in doc["paths"]["/"]["get"] and "security" in doc["paths"]["/v1/models"]["get"]


# ---- in the browser ---------------------------------------------------------------------------------------
# [reply text, its speed line, whether a reply is in flight]
_REPLY = """const m = [...document.querySelectorAll('#log .msg.assistant')].at(-1);
return [m ? m.querySelector('.text').textContent : '', m ? m.querySelector('.stats').textContent : '',
        document.body.classList.contains('busy')];"""


def _watch_reply(driver, timeout=120.0) -> list[int]:
    """Reply lengths seen while the reply streams, until it ends."""
    seen = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        text, _, busy = driver.execute_script(_REPLY)
        if not busy:
            return seen
        seen.append(len(text))
        time.sleep(0.02)
    raise AssertionError("the reply did not end")


def test_chat_in_the_browser(browser, server):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d = browser
    find = lambda css: d.find_element(By.CSS_SELECTOR, css)  # noqa: E731
    reply = lambda: d.execute_script(_REPLY)  # noqa: E731
    n_messages = lambda: len(d.find_elements(By.CSS_SELECTOR, "#log .msg"))  # noqa: E731

    def models():
        return [o.get_attribute("value") for o in find("#model").find_elements(By.TAG_NAME, "option")]

    d.get(server.url + "/")
    assert d.title == "tokenloom chat"
    # no key yet: the page loads, the model list does not, and the page says why
    _wait("the API-key notice", lambda: "API key" in find("#status").text)
    assert models() == []
    find("#api-key").send_keys(KEY, Keys.TAB)  # the key is taken on change (leaving the field)
    _wait("the model picker", lambda: models() == [server.model])
    assert find("#model").get_attribute("value") == server.model and find("#status").text == ""

    find("#system").send_keys("Answer in words.")
    for field, value in [("#max_tokens", "2000"), ("#seed", "7"), ("#temperature", "0.9"), ("#top_k", "40")]:
        find(field).send_keys(value)
    # Shift+Enter is a new line, Enter sends; markup typed by the user stays text
    prompt = find("#prompt")
    prompt.send_keys("<b>Hello</b>")
    ActionChains(d).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).send_keys("loom").perform()
    assert prompt.get_attribute("value") == "<b>Hello</b>\nloom" and n_messages() == 0
    prompt.send_keys(Keys.ENTER)
    assert prompt.get_attribute("value") == "" and find("#stop").is_enabled() and not find("#send").is_enabled()
    seen = _watch_reply(d)
    assert len({n for n in seen if n}) >= 2 and seen == sorted(seen), seen  # it grew while we watched
    text, stats, _ = reply()
    assert re.fullmatch(r"2000 tokens · [\d.]+ tok/s · first token after \d+ ms · max tokens reached", stats), stats
    assert len(text.split()) == 2000 and all(re.fullmatch(r"w\d+", w) for w in text.split())
    assert find(".msg.user .text").text == "<b>Hello</b>\nloom" and not d.find_elements(By.CSS_SELECTOR, "#log b")
    assert find("#send").is_enabled() and not find("#stop").is_enabled()

    # the conversation, settings and key survive a reload (localStorage)
    d.refresh()
    _wait("the model picker after the reload", lambda: models() == [server.model])
    assert [m.get_attribute("class") for m in d.find_elements(By.CSS_SELECTOR, "#log .msg")] == \
        ["msg user", "msg assistant"]
    assert reply()[:2] == [text, stats]
    assert find("#max_tokens").get_attribute("value") == "2000"
    assert find("#system").get_attribute("value") == "Answer in words."

    # Stop mid-reply: the reply stops growing, the server aborts the request, the page is ready again
    aborted = _metric(server.url, "tokenloom_request_aborted_total")
    find("#max_tokens").clear()  # the server's default: the rest of the context, thousands of tokens
    find("#prompt").send_keys("Tell me more", Keys.ENTER)
    first = _wait("the second reply", lambda: len(reply()[0]))
    _wait("the second reply to grow", lambda: len(reply()[0]) > first)
    find("#stop").click()
    _wait("the page to be idle", lambda: not reply()[2])
    stopped, stats, _ = reply()
    assert stats.startswith("stopped · ~") and "tok/s" in stats and "max tokens" not in stats, stats
    time.sleep(0.5)
    assert reply()[0] == stopped  # nothing more arrives
    assert find("#send").is_enabled() and not find("#stop").is_enabled()
    _wait("the server to abort the request",
          lambda: _metric(server.url, "tokenloom_request_aborted_total") == aborted + 1, 15)
    _wait("no request left running", lambda: _metric(server.url, "tokenloom_num_requests_running") == 0, 15)

    # the conversation goes on after a stop
    find("#max_tokens").send_keys("8")
    find("#prompt").send_keys("Go on", Keys.ENTER)
    _wait("the third reply", lambda: reply()[1].startswith("8 tokens"))
    assert n_messages() == 6 and find("#status").text == ""

    # New chat clears the history, for good
    find("#new-chat").click()
    assert n_messages() == 0
    d.refresh()
    _wait("the model picker after the reload", lambda: models() == [server.model])
    assert n_messages() == 0
