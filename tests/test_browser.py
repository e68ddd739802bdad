"""The chat page in headless Chromium against the real server and the demo model.

Debian's `chromium` and `chromium-driver`, driven by Selenium through /usr/bin/chromedriver (Selenium Manager is
never asked for a driver, and nothing is downloaded but Debian packages). `make prepare-browser` (run by `make test`)
installs the browser and the CJK and emoji fonts with apt, which needs root and apt-get; where they are missing the
test is skipped, unless TOKENSTREAM_BROWSER_TEST_REQUIRED=1 (set by .ci/run) turns the skip into a failure.

The server's engine takes decode steps only when the test permits them (the step gate), so the answer's growth
between snapshots, and a Stop while the stream is held, do not depend on the machine's speed. Artefacts (the
screenshot, chromedriver's log) go to build/browser-test/.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from service.config import Config
from tests.support.hooks import StepGate
from tests.support.http_front import base_url
from tests.support.servers import ServerThread, base_config

ROOT = Path(__file__).resolve().parents[1]
ARTEFACTS = ROOT / "build" / "browser-test"
REQUIRED = os.environ.get("TOKENSTREAM_BROWSER_TEST_REQUIRED") == "1"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Without the background-networking flags, Chromium's own connections are refused on a closed network.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1000,860", "--lang=en-US")
PROMPT_CJK, PROMPT_EMOJI = "话说天下大势，分久必合", " 👋🏽"  # the demo model answers this in Chinese
WAIT_S = 120  # an upper bound on waiting for an event (a chunk drawn, a slot freed), not a speed assumption


def _cannot_run() -> str | None:
    if os.geteuid() != 0:
        return "needs root, to install chromium and chromium-driver with apt-get"
    if shutil.which("apt-get") is None:
        return "needs apt-get, to install chromium and chromium-driver"
    return None


if (_reason := _cannot_run()) is not None:
    if REQUIRED:
        pytest.fail(f"browser test required (TOKENSTREAM_BROWSER_TEST_REQUIRED=1) but it {_reason}", pytrace=False)
    pytest.skip(_reason, allow_module_level=True)

from selenium import webdriver  # noqa: E402 -- only where the test runs
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def browser_packages() -> None:
    """Installed beforehand by `make prepare-browser` (scripts/browser_packages.sh), never inside a test."""
    check = subprocess.run(["bash", str(ROOT / "scripts" / "browser_packages.sh"), "--check"], capture_output=True,
                           text=True, check=False)
    if check.returncode != 0:
        why = f"{check.stdout.strip()}: `make prepare-browser` installs them"
        if REQUIRED:
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    for path in (CHROMIUM, CHROMEDRIVER):
        assert Path(path).is_file(), f"{path} is missing though its package is installed"


@pytest.fixture(scope="module")
def gated_config() -> Config:
    """conftest's gated server (`gated_server`, with its `gate`) serves the demo model and the chat page."""
    return base_config("demo", http_port=-1)


@pytest.fixture(scope="module")
def browser(browser_packages: None) -> Iterator[WebDriver]:
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tokenstream-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        service = webdriver.ChromeService(executable_path=CHROMEDRIVER,
                                          log_output=str(ARTEFACTS / "chromedriver.log"))
        driver = webdriver.Chrome(options=options, service=service)
        try:
            yield driver
        finally:
            driver.quit()


def open_page(driver: WebDriver, server: ServerThread) -> None:
    driver.get(base_url(server) + "/")
    name = server.engine.info.name
    wait(driver, lambda d: name in d.find_element(By.ID, "model").text, "the page to load the model's name")


def wait(driver: WebDriver, condition, what: str) -> None:  # type: ignore[no-untyped-def]
    WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(condition, f"timed out waiting for {what}")


def answer(driver: WebDriver) -> str:
    texts = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .text")
    return texts[-1].get_attribute("textContent") if texts else ""  # type: ignore[return-value]


def shown(driver: WebDriver, output: str) -> str:
    return driver.find_element(By.ID, output).get_attribute("value") or ""


def page_state(driver: WebDriver) -> str:
    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-state") or ""


def type_prompt(driver: WebDriver) -> None:
    box = driver.find_element(By.ID, "prompt")
    box.click()
    box.send_keys(PROMPT_CJK)
    # ChromeDriver's send_keys takes only characters of the Basic Multilingual Plane: the emoji goes in as text
    # input through the DevTools protocol, as an input method would insert it.
    driver.execute_cdp_cmd("Input.insertText", {"text": PROMPT_EMOJI})  # type: ignore[attr-defined]
    assert box.get_attribute("value") == PROMPT_CJK + PROMPT_EMOJI


def buttons(driver: WebDriver) -> dict[str, bool]:
    return {name: driver.find_element(By.ID, name).is_enabled() for name in ("stop", "generate")}


def set_setting(driver: WebDriver, element_id: str, value: str) -> None:
    box = driver.find_element(By.ID, element_id)
    driver.execute_script("arguments[0].closest('details').open = true", box)
    box.clear()
    box.send_keys(value)


def test_the_answer_streams_into_the_page_token_by_token(browser: WebDriver, gated_server: ServerThread,
                                                         gate: StepGate) -> None:
    engine = gated_server.engine
    open_page(browser, gated_server)
    set_setting(browser, "max-tokens", "40")
    set_setting(browser, "temperature", "0")
    type_prompt(browser)
    browser.find_element(By.ID, "generate").click()

    # Prefill gives the first token with the gate closed; each round permits 4 decode steps, waits until the engine
    # has taken them and the page has drawn more, and takes a snapshot. 4 tokens always complete a character.
    snapshots = []
    wait(browser, lambda d: answer(d) != "", "the first token")
    snapshots.append(answer(browser))
    assert buttons(browser) == {"stop": True, "generate": False}
    while len(snapshots) < 6 and page_state(browser) == "streaming":
        target = engine.stats().steps + 4
        gate.permit(4)
        assert engine.wait_until(lambda s, target=target: s.steps >= target, WAIT_S)
        before = snapshots[-1]
        wait(browser, lambda d, before=before: answer(d) != before or page_state(d) != "streaming",
             "the answer to grow")
        snapshots.append(answer(browser))
    assert len(snapshots) >= 4, "the demo model ended its answer before the test could watch it grow"
    gate.open()
    wait(browser, lambda d: page_state(d) != "streaming", "the answer to end")
    assert page_state(browser) == "done"
    final = answer(browser)
    snapshots.append(final)

    # It grew monotonically: each snapshot extends the one before, and the last is the whole answer.
    for earlier, later in itertools.pairwise(snapshots):
        assert later.startswith(earlier) and len(later) >= len(earlier)
    assert len(set(snapshots)) >= 4
    sdk = openai.OpenAI(base_url=base_url(gated_server) + "/v1", api_key="unused", max_retries=0, timeout=60)
    reference = sdk.chat.completions.create(model=engine.info.name, max_tokens=40, temperature=0,
                                            messages=[{"role": "user", "content": PROMPT_CJK + PROMPT_EMOJI}])
    assert final == reference.choices[0].message.content
    assert re.search(r"[\u4e00-\u9fff]", final), f"expected Chinese from the demo model, got {final!r}"
    # The prompt went to the server intact (emoji included): the page reports the same prompt token count.
    assert reference.usage is not None
    note = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .note")[-1].text
    assert f"prompt {reference.usage.prompt_tokens} tokens" in note and "finished: max_tokens" in note
    user = browser.find_elements(By.CSS_SELECTOR, ".msg.user .text")[-1].get_attribute("textContent")
    assert user == PROMPT_CJK + PROMPT_EMOJI

    assert re.fullmatch(r"\d+ ms", shown(browser, "ttft")), shown(browser, "ttft")
    assert re.fullmatch(r"\d+(\.\d)?", shown(browser, "rate")), shown(browser, "rate")
    assert shown(browser, "tokens") == str(reference.usage.completion_tokens)
    assert glyphs_render(browser) == {"cjk_inked": True, "cjk_distinct": True, "emoji_coloured": True}

    screenshot = ARTEFACTS / "page.png"
    assert browser.save_screenshot(str(screenshot)) is True
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000


def test_stop_cancels_the_request_on_the_server(browser: WebDriver, gated_server: ServerThread,
                                                gate: StepGate) -> None:
    """Keyboard only: Enter generates, Escape stops. The stream is held by the gate, so Stop comes mid-answer."""
    engine = gated_server.engine
    open_page(browser, gated_server)
    set_setting(browser, "max-tokens", "400")
    type_prompt(browser)
    browser.find_element(By.ID, "prompt").send_keys(Keys.ENTER)
    wait(browser, lambda d: answer(d) != "", "the first token")
    assert engine.wait_until(lambda s: s.active == 1, WAIT_S)
    steps = engine.stats().steps
    browser.find_element(By.ID, "prompt").send_keys(Keys.ESCAPE)
    # No step is permitted: the slot is freed because the page closed the request, not because it ran out.
    assert engine.wait_until(lambda s: s.active == 0, WAIT_S)
    assert engine.stats().steps == steps
    wait(browser, lambda d: page_state(d) == "stopped", "the page to show the stop")
    notes = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .note")
    assert answer(browser) != "" and "stopped" in notes[-1].text  # the partial answer stays
    assert buttons(browser) == {"stop": False, "generate": True}


def glyphs_render(driver: WebDriver) -> dict[str, bool]:
    """CJK and emoji are drawn with real glyphs in the page's font: two different Chinese characters draw ink, and
    differently (a missing glyph draws the same box for both), and the emoji draws in colour."""
    return dict(driver.execute_script("""
        const font = getComputedStyle(document.body).font;
        function pixels(text) {
          const canvas = document.createElement("canvas");
          canvas.width = canvas.height = 48;
          const ctx = canvas.getContext("2d");
          ctx.font = font.replace(/\\d+px/, "32px");
          ctx.textBaseline = "top";
          ctx.fillStyle = "#000";
          ctx.fillText(text, 4, 4);
          return ctx.getImageData(0, 0, 48, 48).data;
        }
        const a = pixels("三"), b = pixels("国");
        const inked = (d) => d.some((v, i) => i % 4 === 3 && v > 0);
        const differ = a.some((v, i) => v !== b[i]);
        const e = pixels("👋");
        let coloured = false;
        for (let i = 0; i < e.length; i += 4) {
          if (e[i + 3] > 0 && (Math.abs(e[i] - e[i + 1]) > 40 || Math.abs(e[i + 1] - e[i + 2]) > 40)) coloured = true;
        }
        return {cjk_inked: inked(a) && inked(b), cjk_distinct: differ, emoji_coloured: coloured};
    """))
