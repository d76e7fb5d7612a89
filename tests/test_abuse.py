"""Abuse of a shared app, against the real app.py (transformers backend, tiny Gemma 4) behind a login:
a burst of concurrent requests, oversize and malformed uploads, an overlong prompt, a chatty session,
requests without the login. Each is answered or refused politely, nothing is lost, the app keeps serving.
And the app killed mid-reply: its history still holds all that was shown."""

from __future__ import annotations

import concurrent.futures
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from gradio_client import handle_file

from chat.history import DB_FILENAME, HistoryStore
from tests.app_process import AppProcess, endless_copy, unreachable_share_server

ANN = ("ann", "pw-ann")
BOB = ("bob", "pw:bob")  # from --auth-file
MAX_NUM_SEQS, MAX_QUEUE, RATE_LIMIT, CONTEXT = 4, 10, 6, 256


def title(message: dict) -> str | None:
    return (message.get("metadata") or {}).get("title")


@pytest.fixture(scope="module")
def app(tiny_vision_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppProcess]:
    tmp = tmp_path_factory.mktemp("abuse")
    logins = tmp / "logins"
    logins.write_text(f"# test logins\n{':'.join(BOB)}\n")
    flags = ["--auth", ":".join(ANN), "--auth-file", str(logins), "--max-num-seqs", str(MAX_NUM_SEQS)]
    flags += ["--max-queue", str(MAX_QUEUE), "--rate-limit", str(RATE_LIMIT), "--max-upload-mb", "1"]
    flags += ["--max-model-len", str(CONTEXT), "--share"]
    model = endless_copy(tiny_vision_model_dir, tmp / "tiny")
    process = AppProcess(model, tmp, *flags, env=unreachable_share_server(tmp))
    try:
        yield process.wait_ready()
    finally:
        process.stop()


def ask(app: AppProcess, text: str, max_tokens: int = 4, files: list[str] = (), login=ANN) -> tuple:
    """One message from a fresh session (a browser tab of its own)."""
    client = app.client(login)
    try:
        return client.predict(
            {"text": text, "files": [handle_file(f) for f in files]}, max_tokens=max_tokens, api_name="/chat"
        )
    finally:
        client.close()


def test_without_the_login_nothing_is_served(app: AppProcess):
    assert "could not open a share link" in app.log_text()
    assert "ANYONE" not in app.log_text()  # shared with a login: no warning
    with pytest.raises(Exception, match="credentials were not provided"):
        app.client()
    with pytest.raises(ValueError, match="Could not login"):
        app.client(("ann", "wrong"))
    with httpx.Client(base_url=app.url) as http:
        assert http.post("gradio_api/upload", files={"files": ("x.png", b"x")}).status_code == 401
        assert http.get("gradio_api/info").status_code == 401
    assert ask(app, "Hi", login=BOB)[3] == 4  # the --auth-file login works too


def test_status_needs_the_login(app: AppProcess):
    with httpx.Client(base_url=app.url) as http:
        assert http.get("status").status_code == 401
        assert http.post("login", data=dict(zip(("username", "password"), BOB, strict=True))).status_code == 200
        status = http.get("status").json()
    assert status["ready"] and status["backend"] == "transformers" and status["max_model_len"] == CONTEXT


def test_twenty_concurrent_requests_are_answered_or_refused_and_none_is_lost(app: AppProcess):
    def one(i: int) -> tuple[str, object]:
        try:
            return "answered", ask(app, f"burst {i}", max_tokens=8)
        except Exception as e:  # gradio_client's QueueError
            return "refused", str(e)

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    answered = [i for i, (kind, _) in enumerate(results) if kind == "answered"]
    refused = [out for kind, out in results if kind == "refused"]
    # max_num_seqs replies at once and max_queue waiting: at least that many get through.
    assert len(answered) >= MAX_NUM_SEQS + MAX_QUEUE, results
    assert all("Queue is full" in message for message in refused), refused
    for i in answered:
        messages, ttft, tok_s, tokens = results[i][1]
        assert tokens == 8 and title(messages[-1]).startswith("TTFT"), messages
    # Every answered request is in Ann's history with its whole reply.
    store = HistoryStore(Path(app.log.parent) / "data" / DB_FILENAME)
    try:
        saved = {c.title: c for c in store.list("user:ann") if c.title.startswith("burst")}
        assert sorted(saved) == sorted(f"burst {i}" for i in answered)
        for summary in saved.values():
            reply = store.load("user:ann", summary.id).messages[1]
            assert reply["stats"]["output_tokens"] == 8
    finally:
        store.close()
    assert ask(app, "Still there?")[3] == 4


def test_an_oversize_upload_is_refused_by_the_server(app: AppProcess, tmp_path: Path):
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(2 * 2**20))
    with pytest.raises(ValueError, match="exceeds the maximum file size"):  # gradio_client checks first
        ask(app, "What is this?", files=[str(big)])
    with httpx.Client(base_url=app.url) as http:  # a client that doesn't check
        assert http.post("login", data=dict(zip(("username", "password"), ANN, strict=True))).status_code == 200
        refused = http.post("gradio_api/upload", files={"files": ("big.png", big.read_bytes())})
    assert refused.status_code == 413 and "maximum allowed size" in refused.text
    assert ask(app, "Still there?")[3] == 4


@pytest.mark.parametrize(
    ("name", "content", "said"),
    [
        ("broken.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 100, "could not be decoded"),
        ("notes.png", b"just some text pretending to be a picture\n", "is not a valid image"),
        ("clip.mp4", os.urandom(4096), "could not be read as a video"),
    ],
)
def test_a_malformed_upload_is_answered_in_the_chat_without_asking_the_engine(app, tmp_path, name, content, said):
    path = tmp_path / name
    path.write_bytes(content)
    messages, ttft, tok_s, tokens = ask(app, "What is this?", files=[str(path)])
    assert len(messages) == 1 and title(messages[0]).startswith(f"⚠️ {name} {said}"), messages
    assert tokens is None
    assert ask(app, "Still there?")[3] == 4


def test_a_prompt_longer_than_the_context_is_answered_with_a_note(app: AppProcess):
    messages, ttft, tok_s, tokens = ask(app, "word " * 400)
    assert len(messages) == 1 and tokens is None
    assert f"the model's context holds {CONTEXT}" in title(messages[0])
    assert "Nothing was sent to the model" in messages[0]["content"][0]["text"]


def test_a_chatty_session_is_slowed_down_and_other_sessions_are_not(app: AppProcess):
    client = app.client(ANN)
    try:
        for _ in range(RATE_LIMIT):
            messages, *_ = client.predict({"text": "again", "files": []}, max_tokens=1, api_name="/chat")
            assert title(messages[-1]).startswith("TTFT")
        messages, *_ = client.predict({"text": "again", "files": []}, max_tokens=1, api_name="/chat")
    finally:
        client.close()
    assert title(messages[0]).startswith(f"⏳ Slow down: at most {RATE_LIMIT} messages a minute")
    assert ask(app, "Hi")[3] == 4


def test_a_crash_loses_nothing_that_was_shown(tiny_model_dir: Path, tmp_path: Path):
    """The app killed mid-reply (SIGKILL: no shutdown code runs): the history holds every token shown."""
    process = AppProcess(endless_copy(tiny_model_dir, tmp_path / "tiny"), tmp_path, "--auth", ":".join(ANN))
    try:
        client = process.wait_ready().client(ANN)
        job = client.submit({"text": "Tell me everything", "files": []}, max_tokens=100_000, api_name="/chat")
        deadline = time.monotonic() + 60
        while sum(1 for messages, *_ in job.outputs() if messages) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        process.proc.kill()
        process.proc.wait()
        shown = [messages for messages, *_ in job.outputs() if messages][-1][-1]["content"][0]["text"]
    finally:
        process.stop()
    store = HistoryStore(tmp_path / "data" / DB_FILENAME)
    try:
        (conversation,) = store.list("user:ann")
        user, reply = store.load("user:ann", conversation.id).messages
    finally:
        store.close()
    assert user["content"] == "Tell me everything"
    assert len(shown) > 20 and reply["content"].startswith(shown)
