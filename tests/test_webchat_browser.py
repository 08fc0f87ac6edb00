"""The web chat page in a real browser: Debian's Chromium, headless, driven by Selenium,
against a real stack (NGINX, three replicas, the retry worker, the stub).

One stack and one browser for the whole file (they are the slow part); each test opens the
page again and finds its own lines by their text.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support import Stack, claim_redis_db, release_redis_db, running_stack, stack_dir

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOT = ROOT / "reports" / "webchat.png"
WAITING = "Waiting for an answer…"

# Retries and the breaker quick enough that a deferred answer comes within a second or two;
# the stub asked as an LLM, so that answers stream.
CHAT_STACK = {
    "UPSTREAM_KIND": "openai",
    "UPSTREAM_MODEL": "stub-model",
    "UPSTREAM_CONNECT_TIMEOUT": "1",
    "UPSTREAM_FIRST_TOKEN_TIMEOUT": "2",
    "UPSTREAM_TOTAL_TIMEOUT": "8",
    "BOT_RATE_LIMIT": "100/second",
    "BOT_RATE_BURST": "1000",
    "BOT_RETRY_BASE_DELAY": "0.2",
    "BOT_RETRY_MAX_DELAY": "0.5",
    "BOT_BREAKER_OPEN_SECONDS": "0.5",
    "BOT_DRAIN_TIMEOUT": "3",
}

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(
        not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
        reason="needs Debian's chromium and chromium-driver (make installs them as root)",
    ),
]


@pytest.fixture(scope="module")
def chat_stack() -> Iterator[Stack]:
    """A stack of the file's own: its tests cut the upstream and kill replicas."""
    owner = f"webchat-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    db = claim_redis_db(owner)
    try:
        with stack_dir() as base, running_stack(base, db, **CHAT_STACK) as stack:
            yield stack
    finally:
        release_redis_db(db, owner)


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="webchat-chromium-")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=900,760",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait(driver: WebDriver, what: Callable[[WebDriver], Any], timeout: float = 15) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(what)


def _status(driver: WebDriver) -> str:
    text: str = driver.find_element(By.ID, "status").text
    return text


def _open(driver: WebDriver, stack: Stack) -> None:
    driver.get(stack.url + "/chat/")
    _wait(driver, lambda d: _status(d) == "Connected")


def _send_with_keyboard(driver: WebDriver, text: str) -> None:
    """Tab to the input as a keyboard user would, type, and press Enter."""
    body = driver.find_element(By.TAG_NAME, "body")
    body.click()
    for _ in range(6):
        if driver.switch_to.active_element.get_attribute("id") == "text":
            break
        webdriver.ActionChains(driver).send_keys(Keys.TAB).perform()
    assert driver.switch_to.active_element.get_attribute("id") == "text"
    webdriver.ActionChains(driver).send_keys(text).send_keys(Keys.ENTER).perform()


def _exchanges(driver: WebDriver) -> list[dict[str, str]]:
    """Each exchange in the transcript: the user's line and the bot's, as text."""
    script = """
        return Array.from(document.querySelectorAll('#log .exchange')).map(e => ({
          id: e.dataset.messageId,
          you: (e.querySelector('.line.you .text') || {}).textContent || '',
          bot: e.querySelector('.line.bot').hidden ? '' :
               e.querySelector('.line.bot .text').textContent,
          pending: e.querySelector('.line.bot').classList.contains('pending'),
        }));"""
    result: list[dict[str, str]] = driver.execute_script(script)
    return result


def _bot_line_for(driver: WebDriver, you: str) -> str:
    """The bot's line under the user's `you`: "" while none, the state while pending."""
    lines = [e["bot"] for e in _exchanges(driver) if e["you"] == you]
    assert len(lines) <= 1, lines  # one exchange per message, whatever was resent
    return lines[0] if lines else ""


def _answer_for(driver: WebDriver, you: str) -> str:
    """The bot's answer under the user's `you`, "" until there is one."""
    lines = [e for e in _exchanges(driver) if e["you"] == you]
    assert len(lines) <= 1, lines
    return lines[0]["bot"] if lines and not lines[0]["pending"] else ""


def test_type_and_send_with_the_keyboard_and_see_the_answer(
    browser: WebDriver, chat_stack: Stack
) -> None:
    _open(browser, chat_stack)
    log = browser.find_element(By.ID, "log")
    assert log.get_attribute("role") == "log"
    label = browser.find_element(By.CSS_SELECTOR, "label[for=text]")
    assert label.text == "Your message"
    _send_with_keyboard(browser, "/echo hello from the keyboard")
    _wait(browser, lambda d: _answer_for(d, "/echo hello from the keyboard") != "")
    assert _answer_for(browser, "/echo hello from the keyboard") == "hello from the keyboard"
    assert browser.find_element(By.ID, "text").get_attribute("value") == ""


def test_a_reply_containing_script_stays_inert_text(browser: WebDriver, chat_stack: Stack) -> None:
    _open(browser, chat_stack)
    payload = "<script>window.__pwned = 1</script><img src=x onerror='window.__pwned = 2'><b>b</b>"
    _send_with_keyboard(browser, "/echo " + payload)
    _wait(browser, lambda d: _answer_for(d, "/echo " + payload) != "")
    assert _answer_for(browser, "/echo " + payload) == payload
    # A question: the language model's answer (the stub repeats it) streams in pieces.
    question = "what is " + payload.replace("<b>", f"<b>{uuid.uuid4().hex[:6]}")
    _send_with_keyboard(browser, question)
    _wait(browser, lambda d: _answer_for(d, question) != "")
    assert _answer_for(browser, question).endswith(f"You asked: {question}")
    assert browser.execute_script("return window.__pwned") is None
    log = browser.find_element(By.ID, "log")
    for tag in ("script", "img", "b"):
        assert log.find_elements(By.TAG_NAME, tag) == []


def _growing(driver: WebDriver, you: str) -> str:
    """The bot's answer under `you` while it streams (not yet whole), else ""."""
    script = """
        const e = Array.from(document.querySelectorAll('#log .exchange'))
          .find(e => (e.querySelector('.line.you .text') || {}).textContent === arguments[0]);
        const bot = e && e.querySelector('.line.bot.streaming.pending');
        return bot && !bot.hidden ? bot.querySelector('.text').textContent : '';"""
    text: str = driver.execute_script(script, you)
    return text


def test_the_answer_grows_on_the_page_as_the_language_model_streams_it(
    browser: WebDriver, chat_stack: Stack
) -> None:
    """The stub streams slowly (a piece every 0.3 s): the page shows the first words, then
    more, before the whole answer, which the words so far begin."""
    _open(browser, chat_stack)
    question = f"name five bright stars {uuid.uuid4().hex[:6]}"  # 8 pieces: over 2 s
    requests.post(chat_stack.stub_url + "/admin/llm", json={"token_ms": 300}, timeout=5)
    try:
        _send_with_keyboard(browser, question)
        first = _wait(browser, lambda d: _growing(d, question))
        more = _wait(
            browser, lambda d: len(_growing(d, question)) > len(first) and _growing(d, question)
        )
        _wait(browser, lambda d: _answer_for(d, question) != "")
    finally:
        requests.post(chat_stack.stub_url + "/admin/llm", json={}, timeout=5)
    final = _answer_for(browser, question)
    assert final.endswith(f"You asked: {question}")
    assert final.startswith(more) and more.startswith(first) and len(first) < len(final), (
        first,
        more,
        final,
    )
    assert _growing(browser, question) == ""  # whole now: no longer marked as growing


def test_a_stream_broken_midway_keeps_its_words_and_the_answer_comes_once(
    browser: WebDriver, chat_stack: Stack
) -> None:
    """Every replica is killed while an answer streams: the page keeps the words it has,
    sends the message again with the same id, and shows one whole answer in their place."""
    _open(browser, chat_stack)
    question = f"name five faint stars {uuid.uuid4().hex[:6]}"
    requests.post(chat_stack.stub_url + "/admin/llm", json={"token_ms": 300}, timeout=5)
    try:
        _send_with_keyboard(browser, question)
        partial = _wait(browser, lambda d: _growing(d, question))
        for i in (1, 2, 3):
            chat_stack.kill(f"bot-{i}", signal.SIGKILL)
    finally:
        requests.post(chat_stack.stub_url + "/admin/llm", json={}, timeout=5)
    time.sleep(0.5)  # the page has seen the stream break
    assert _growing(browser, question).startswith(partial)  # the words stay meanwhile
    _wait(browser, lambda d: _answer_for(d, question) != "", timeout=45)
    assert _answer_for(browser, question).endswith(f"You asked: {question}")
    assert [e["you"] for e in _exchanges(browser)].count(question) == 1


def test_upstream_outage_then_recovery_the_deferred_answer_appears_without_reload(
    browser: WebDriver, chat_stack: Stack
) -> None:
    _open(browser, chat_stack)
    question = f"what is a pulsar, {uuid.uuid4().hex[:6]}?"
    chat_stack.faults(outage=True, latency_ms=5)
    try:
        _send_with_keyboard(browser, question)
        _wait(browser, lambda d: _bot_line_for(d, question) == WAITING)
        calls = chat_stack.stub_stats()["failures"]
        assert calls > 0  # the outage did happen
        time.sleep(1)
        assert _bot_line_for(browser, question) == WAITING
    finally:
        chat_stack.faults(outage=False, latency_ms=5)
    page = browser.execute_script("return performance.timeOrigin")
    _wait(browser, lambda d: _answer_for(d, question) != "", timeout=30)
    assert question in _answer_for(browser, question)  # the stub answers with the question
    assert browser.execute_script("return performance.timeOrigin") == page  # no reload


def test_replicas_killed_while_the_page_is_open_it_reconnects_and_loses_nothing(
    browser: WebDriver, chat_stack: Stack
) -> None:
    """Every replica is killed under an open page: its stream breaks, the page says so, the
    message typed meanwhile fails and is resent with the same id; all is answered once."""
    _open(browser, chat_stack)
    # The history first: the stream replays earlier answers just after "Connected".
    _wait(browser, lambda d: not any(e["pending"] for e in _exchanges(d)))
    before = _exchanges(browser)
    for i in (1, 2, 3):
        chat_stack.kill(f"bot-{i}", signal.SIGKILL)
    _wait(browser, lambda d: _status(d) in ("Reconnecting…", "Connecting…"))
    _send_with_keyboard(browser, "/echo sent while the replicas were down")
    _wait(browser, lambda d: _status(d) == "Connected", timeout=45)
    _wait(
        browser,
        lambda d: _answer_for(d, "/echo sent while the replicas were down") != "",
        timeout=30,
    )
    assert _answer_for(browser, "/echo sent while the replicas were down") == (
        "sent while the replicas were down"
    )
    after = _exchanges(browser)
    assert after[: len(before)] == before  # nothing lost, nothing doubled
    assert len(after) == len(before) + 1


def test_reload_restores_the_history(browser: WebDriver, chat_stack: Stack) -> None:
    _open(browser, chat_stack)
    before = _exchanges(browser)
    assert len(before) >= 4
    browser.refresh()
    _wait(browser, lambda d: _status(d) == "Connected")
    _wait(browser, lambda d: _exchanges(d) == before)


def test_no_critical_accessibility_violations_and_a_screenshot(
    browser: WebDriver, chat_stack: Stack
) -> None:
    from axe_selenium_python import Axe

    _open(browser, chat_stack)
    _wait(browser, lambda d: not any(e["pending"] for e in _exchanges(d)))
    axe = Axe(browser)
    axe.inject()
    results = axe.run()
    critical = [v["id"] for v in results["violations"] if v["impact"] == "critical"]
    assert critical == [], results["violations"]
    serious = [v["id"] for v in results["violations"] if v["impact"] == "serious"]
    assert serious == [], results["violations"]
    SCREENSHOT.parent.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT))
    # At a phone's width nothing scrolls sideways.
    browser.set_window_size(375, 740)
    try:
        wide = browser.execute_script(
            "return document.documentElement.scrollWidth > window.innerWidth"
        )
        assert not wide
    finally:
        browser.set_window_size(900, 760)


def test_the_page_loads_no_script_but_its_own(browser: WebDriver, chat_stack: Stack) -> None:
    """The CSP holds: an inline script injected into the page is refused by the browser."""
    _open(browser, chat_stack)
    refused = browser.execute_async_script(
        """
        const done = arguments[0];
        document.addEventListener('securitypolicyviolation', () => done(true), {once: true});
        const s = document.createElement('script');
        s.textContent = 'window.__inline = 1';
        document.body.append(s);
        setTimeout(() => done(window.__inline === undefined), 1000);
        """
    )
    assert refused
    try:
        requests.get(chat_stack.url + "/chat/", timeout=5).raise_for_status()
    except requests.RequestException as exc:  # pragma: no cover - stack gone
        raise WebDriverException(str(exc)) from exc
