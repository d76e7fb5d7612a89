"""--share without a login warns loudly, and without --api-key turns /v1 off; a share tunnel that can't be reached
leaves the app serving locally.
And --desktop: a native window where pywebview is installed, else the browser."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from chat import desktop
from tests.app_process import AppProcess, endless_copy, unreachable_share_server


@pytest.fixture(scope="module")
def shared(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppProcess]:
    tmp = tmp_path_factory.mktemp("sharing")
    process = AppProcess(endless_copy(tiny_model_dir, tmp / "tiny"), tmp, "--share", env=unreachable_share_server(tmp))
    try:
        yield process.wait_ready("could not open a share link")  # the share attempt has given up
    finally:
        process.stop()


def test_sharing_without_a_login_warns_loudly(shared: AppProcess):
    log = shared.log_text()
    assert "--share without --auth: ANYONE who gets the public link can use this app" in log
    assert "Add --auth USER:PASS (or --auth-file FILE)" in log


def test_an_unreachable_share_server_leaves_the_app_serving_locally(shared: AppProcess):
    assert (
        f"could not open a share link (no internet, or gradio.live unreachable); serving locally only at {shared.url}"
        in shared.log_text()
    )
    client = shared.client()
    messages, ttft, tok_s, tokens = client.predict({"text": "Hi", "files": []}, max_tokens=3, api_name="/chat")
    client.close()
    assert tokens == 3 and shared.proc.poll() is None


def test_sharing_without_an_api_key_turns_v1_off_and_says_so(shared: AppProcess):
    assert "/v1 is off: --share makes this app public" in shared.log_text()
    response = httpx.get(f"{shared.url}v1/models")
    error = response.json()["error"]
    assert response.status_code == 403 and error["type"] == "api_off"
    assert "start the app with --api-key KEY (or --api-key-file FILE)" in error["message"]


def test_desktop_opens_a_native_window_where_pywebview_is_installed(monkeypatch):
    calls = []
    webview = types.SimpleNamespace(
        create_window=lambda title, url, **size: calls.append(("window", title, url)),
        start=lambda: calls.append(("start",)),
    )
    monkeypatch.setitem(sys.modules, "webview", webview)
    monkeypatch.setattr(desktop.webbrowser, "open", lambda url: calls.append(("browser", url)))
    assert desktop.open_window("http://127.0.0.1:7860/", "Gemma 4 chat")
    assert calls == [("window", "Gemma 4 chat", "http://127.0.0.1:7860/"), ("start",)]


def test_desktop_falls_back_to_the_browser_without_pywebview(monkeypatch, caplog):
    opened = []
    monkeypatch.setitem(sys.modules, "webview", None)  # as if not installed: import raises ImportError
    monkeypatch.setattr(desktop.webbrowser, "open", opened.append)
    with caplog.at_level("INFO"):
        assert not desktop.open_window("http://127.0.0.1:7860/", "Gemma 4 chat")
    assert opened == ["http://127.0.0.1:7860/"] and "pywebview is not installed" in caplog.text


def test_desktop_falls_back_to_the_browser_without_a_display(monkeypatch, caplog):
    def no_display() -> None:
        raise RuntimeError("no display")

    opened = []
    webview = types.SimpleNamespace(create_window=lambda *args, **kwargs: None, start=no_display)
    monkeypatch.setitem(sys.modules, "webview", webview)
    monkeypatch.setattr(desktop.webbrowser, "open", opened.append)
    assert not desktop.open_window("http://127.0.0.1:7860/", "Gemma 4 chat")
    assert opened == ["http://127.0.0.1:7860/"] and "no native window (no display)" in caplog.text
