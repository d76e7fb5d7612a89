"""The app in a real browser: Playwright drives Debian's Chromium (headless, its own profile) against app.py on
the tiny vision Gemma 4. Type, send, watch it stream and the sidebar's numbers move, stop, upload an image,
reload and find the chat in the history, restart the app and go on with it; a second browser sees none of it.

`make test` installs Chromium and Playwright; without them these tests skip, except in CI (CI=true), where
they fail. A failing test leaves a screenshot in test-results/.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from tests.app_process import ROOT, AppProcess, endless_copy

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-results"
TIMEOUT_MS = 30_000


def _need(what: str, available: bool) -> None:
    if available:
        return
    reason = f"{what} is missing: `make test` installs it"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason, allow_module_level=True)


try:
    from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright
except ImportError:
    _need("playwright (pip)", False)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    _need("chromium (apt)", Path(CHROMIUM).exists())
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def model(tiny_vision_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return endless_copy(tiny_vision_model_dir, tmp_path_factory.mktemp("browser") / "tiny")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("browser-data")


@pytest.fixture(scope="module")
def app(model: Path, data_dir: Path) -> Iterator[AppProcess]:
    process = AppProcess(model, data_dir.parent, "--data-dir", str(data_dir))
    try:
        yield process.wait_ready()
    finally:
        process.stop()


@pytest.fixture(scope="module")
def context(browser: Browser) -> Iterator[BrowserContext]:
    """One browser profile for the module: its localStorage carries the chat history's owner id."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(TIMEOUT_MS)
    yield context
    context.close()


@contextmanager
def screenshot_on_failure(page: Page, name: str) -> Iterator[None]:
    try:
        yield
    except BaseException:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.png"
        page.screenshot(path=str(path), full_page=True)
        print(f"screenshot of the failure: {path}")
        raise


def open_app(page: Page, app: AppProcess) -> None:
    page.goto(app.url)
    expect(page.locator(".engine-status.ready")).to_be_visible()


def textbox(page: Page):
    return page.get_by_role("group", name="Multimedia input field").get_by_role("textbox")


def metric(page: Page, label: str) -> float:
    return float(page.get_by_label(label).input_value() or 0)


def stop_button(page: Page):
    return page.get_by_role("button", name="Stop", exact=True)


CHAT_LOG = "[aria-label='chatbot conversation']"


def chat_text(page: Page) -> str:
    """All the chat's text, collapsed thoughts included, whitespace normalized."""
    return " ".join(page.locator(CHAT_LOG).text_content().split())


def send(page: Page, text: str) -> None:
    """Send a message and wait for its reply to start streaming."""
    users, bots = page.locator(".user-row").count(), page.locator(".bot-row").count()
    textbox(page).fill(text)
    textbox(page).press("Enter")
    expect(page.locator(".user-row")).to_have_count(users + 1)
    expect(stop_button(page)).to_be_visible()
    expect(page.locator(".bot-row")).to_have_count(bots + 1)


def stop_streaming_reply(page: Page) -> str:
    """Watch the reply grow a while (the endless tiny model never ends on its own), stop it; the chat's text."""
    page.wait_for_function(
        "([log, n]) => document.querySelector(log).textContent.length > n",
        arg=[CHAT_LOG, len(page.locator(CHAT_LOG).text_content()) + 40],
    )
    stop_button(page).click()
    expect(page.get_by_role("button", name="Submit", exact=True)).to_be_visible()
    stopped = chat_text(page)
    time.sleep(0.5)
    assert chat_text(page) == stopped, "the reply went on after stop"
    return stopped


def chat_entry(page: Page, title: str):
    return page.locator("#chat-list label", has_text=title)


def test_a_chat_streams_stops_takes_an_image_and_is_found_after_a_reload(
    app: AppProcess, context: BrowserContext, tmp_path: Path
):
    page = context.new_page()
    with screenshot_on_failure(page, "chat"):
        open_app(page, app)
        assert metric(page, "tokens") == 0
        send(page, "Hello there")
        expect(page.locator(".user-row")).to_contain_text("Hello there")
        page.wait_for_function("() => Number(document.querySelector('[aria-label=\"tokens\"]').value) > 0")
        tokens_while_streaming = metric(page, "tokens")
        stop_streaming_reply(page)
        assert metric(page, "tokens") > tokens_while_streaming and metric(page, "tok/s") > 0
        assert metric(page, "TTFT (s)") > 0
        assert "stopped by the user" in app.log_text()

        picture = tmp_path / "red.png"
        Image.new("RGB", (64, 48), "red").save(picture)
        page.get_by_test_id("file-upload").set_input_files(str(picture))
        expect(page.locator("[data-testid='upload-button']")).to_be_enabled()
        send(page, "What is in the picture?")
        expect(page.locator(".user-row img")).to_be_visible()
        shown = stop_streaming_reply(page)

        page.reload()
        expect(page.locator(".engine-status.ready")).to_be_visible()
        expect(chat_entry(page, "Hello there")).to_be_visible()
        expect(page.locator(".bot-row")).to_have_count(0)  # a new chat until one is picked
        chat_entry(page, "Hello there").click()
        expect(page.locator(".user-row")).to_have_count(2)
        expect(page.locator(".user-row img")).to_be_visible()
        # The chat as it was when stopped, from the server's history: it keeps every token the server streamed,
        # which may include the last update that the stop kept from reaching the page.
        assert chat_text(page).startswith(shown)


def test_a_second_browser_gets_a_chat_of_its_own_to_undo_rename_export_import_and_delete(
    app: AppProcess, browser: Browser, tmp_path: Path
):
    other = browser.new_context(accept_downloads=True)
    other.set_default_timeout(TIMEOUT_MS)
    page = other.new_page()
    try:
        with screenshot_on_failure(page, "second-browser"):
            open_app(page, app)
            expect(page.locator("#chat-list")).to_be_attached()
            expect(chat_entry(page, "Hello there")).to_have_count(0)
            send(page, "Only mine")
            stop_streaming_reply(page)
            send(page, "Undo this")
            stop_streaming_reply(page)
            page.get_by_role("button", name="Undo").last.click()
            expect(page.locator(".user-row")).to_have_count(1)
            page.reload()
            expect(chat_entry(page, "Hello there")).to_have_count(0)
            chat_entry(page, "Only mine").click()
            expect(page.locator(".user-row")).to_have_count(1)  # the undo reached the history too

            rename = page.get_by_placeholder("Rename this chat…")
            rename.fill("Mine, renamed")
            rename.press("Enter")
            expect(chat_entry(page, "Mine, renamed")).to_be_visible()

            page.get_by_role("button", name="Export", exact=True).click()
            exported = page.locator("#chat-export a[download]")
            expect(exported).to_have_count(2)
            files = {}
            for link in exported.all():
                with page.expect_download() as download:
                    link.click()
                path = tmp_path / download.value.suggested_filename
                download.value.save_as(path)
                files[path.suffix] = path
            assert files[".md"].read_text().startswith("# Mine, renamed")
            assert '"title": "Mine, renamed"' in files[".json"].read_text()

            page.get_by_test_id("Import JSON-upload-button").set_input_files(str(files[".json"]))
            expect(chat_entry(page, "Mine, renamed")).to_have_count(2)
            expect(page.locator(".user-row")).to_contain_text("Only mine")  # the imported copy, opened

            page.get_by_role("button", name="Delete", exact=True).click()
            expect(chat_entry(page, "Mine, renamed")).to_have_count(1)
            expect(page.locator(".user-row")).to_have_count(0)
    finally:
        other.close()


def test_the_chat_goes_on_after_an_app_restart(app: AppProcess, model: Path, data_dir: Path, context: BrowserContext):
    app.stop()
    # The same port: the browser keeps its id per origin (scheme, host and port).
    restarted = AppProcess(model, data_dir.parent, "--data-dir", str(data_dir), port=app.port).wait_ready()
    page = context.new_page()
    try:
        with screenshot_on_failure(page, "restart"):
            open_app(page, restarted)
            expect(chat_entry(page, "Only mine")).to_have_count(0)
            chat_entry(page, "Hello there").click()
            expect(page.locator(".user-row")).to_have_count(2)
            send(page, "And after the restart?")
            stop_streaming_reply(page)
            page.reload()
            chat_entry(page, "Hello there").click()
            expect(page.locator(".user-row")).to_have_count(3)
            expect(page.locator(".user-row").last).to_contain_text("And after the restart?")
    finally:
        restarted.stop()
