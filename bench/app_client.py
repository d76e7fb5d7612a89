"""Arm (c): the whole app, started as `python app.py ...`, driven through its Gradio API with gradio_client.

Timing: gradio_client's job thread polls its message queue every 50 ms, so the time at which an update
shows up in `job.outputs()` lags its arrival by up to that. The bench stamps each message as the SSE
reader thread parses it instead (a dict/deque hook on `Client.pending_messages_per_event`) and falls back
to the iteration times, saying so, if a future gradio_client no longer fits the hook.

The /chat endpoint (gr.ChatInterface) keeps the conversation per session, so every request gets a fresh
Client (made before the clock starts): each reply is a one-turn chat, as in the other arms.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.workload import RequestResult

CHAT_API = "/chat"
PROMPT_TOKENS = re.compile(r"prompt (\d+) tokens")


class AppFailed(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ process


class AppProcess:
    """app.py in a process group of its own, so that stopping it also stops vLLM's engine processes."""

    def __init__(self, cmd: list[str], *, cwd: Path, log_path: Path, env: dict[str, str] | None = None):
        self.cmd = cmd
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.started = time.time()
        self.proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def mark(self, text: str) -> None:
        """A line of the bench's own in the app's log (e.g. where the warm-up ended)."""
        self._log.write(f"\n[bench] {text}\n".encode())
        self._log.flush()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, grace_s: float = 20.0) -> int | None:
        """Ctrl+C first (the app then shuts the engine down), then SIGTERM, then SIGKILL, to the whole group."""
        for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        # The engine core may outlive the app by a moment; it is in the same group.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()
        return self.proc.returncode


# ------------------------------------------------------------------------------------------- client


class _StampedDeque(collections.deque):
    def __init__(self, log: list, items=()):
        super().__init__(items)
        self._stamp_log = log

    def append(self, msg):  # called by gradio_client's SSE reader thread as each message is parsed
        if isinstance(msg, dict):
            self._stamp_log.append((time.perf_counter(), msg.get("msg")))
        super().append(msg)


class _StampingDict(dict):
    """Stands in for `Client.pending_messages_per_event`: wraps each event's deque to stamp arrivals."""

    def __init__(self, log: list):
        super().__init__()
        self.stamp_log = log

    def __setitem__(self, key, value):
        if type(value) is collections.deque:
            value = _StampedDeque(self.stamp_log, value)
        super().__setitem__(key, value)

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]


@dataclass
class ChatEndpoint:
    """Where things are in /chat's inputs and outputs, read from the app's own API description."""

    params: list[str]
    defaults: dict[str, Any]
    returns: list[str]
    tokens_index: int | None
    ttft_index: int | None
    rate_index: int | None

    @classmethod
    def from_api_info(cls, info: dict[str, Any]) -> ChatEndpoint:
        endpoint = info["named_endpoints"][CHAT_API]
        params = [p["parameter_name"] for p in endpoint["parameters"]]
        defaults = {p["parameter_name"]: p.get("parameter_default") for p in endpoint["parameters"]}
        labels = [(r.get("label") or "").lower() for r in endpoint["returns"]]

        def find(pred) -> int | None:
            return next((i for i, label in enumerate(labels) if pred(label)), None)

        return cls(
            params=params,
            defaults=defaults,
            returns=labels,
            tokens_index=find(lambda s: "token" in s and "tok/s" not in s and "prompt" not in s),
            ttft_index=find(lambda s: "ttft" in s),
            rate_index=find(lambda s: "tok/s" in s),
        )

    def kwargs(self, text: str, max_tokens: int) -> dict[str, Any]:
        """Keyword arguments for a greedy, non-thinking reply of at most `max_tokens`."""
        wanted = {
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "enable_thinking": False,
            "system_prompt": "",
        }
        missing = [k for k in ("max_tokens", "temperature") if k not in self.params]
        if missing:
            raise AppFailed(f"{CHAT_API} takes {self.params}; the bench needs {missing}")
        message = next(p for p in self.params if p not in wanted)  # the textbox comes first
        out = {message: {"text": text, "files": []}}
        out.update({k: v for k, v in wanted.items() if k in self.params})
        return out


def _messages(output: Any) -> list[dict[str, Any]]:
    first = output[0] if isinstance(output, (tuple, list)) and output and isinstance(output[0], list) else output
    return [m for m in first if isinstance(m, dict)] if isinstance(first, list) else []


def _notes(output: Any) -> list[tuple[str, str]]:
    """(title, body) of the app's own notes in the reply (errors, loading, the stats line)."""
    notes = []
    for m in _messages(output):
        title = (m.get("metadata") or {}).get("title")
        if title:
            notes.append((str(title), _content_text(m.get("content"))))
    return notes


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(c.get("text", "") if isinstance(c, dict) else str(c) for c in content)
    return ""


def _field(output: Any, index: int | None) -> Any:
    if index is None or not isinstance(output, (tuple, list)) or index >= len(output):
        return None
    return output[index]


@dataclass
class AppSession:
    """A fresh gradio_client session whose SSE messages are stamped on arrival."""

    client: Any
    stamps: list = field(default_factory=list)
    hooked: bool = False
    opened: bool = False  # the server holds its session state, as for a page open in a browser


def open_session(client: Any) -> bool:
    """Have the server set up this session's state, as a browser's page does when it opens (its sidebar's first
    poll), so that no request pays for it on the clock: Gradio builds a copy of every component's config for a
    session's first event, ~5 ms of CPU for this UI. False where the app has no such poll."""
    import httpx

    polls = [
        d
        for d in client.config.get("dependencies", [])
        if any(target[1] == "tick" for target in d.get("targets", [])) and not d.get("inputs")
    ]
    if not polls:
        return False
    body = {"data": [], "fn_index": polls[0]["id"], "session_hash": client.session_hash}
    response = httpx.post(client.api_url, json=body, headers=client.headers, timeout=30)
    return response.status_code == 200


class AppClient:
    def __init__(self, url: str, *, tokenizer: Any = None):
        self.url = url
        self.tokenizer = tokenizer  # counts the reply's tokens only if the app does not report them
        self.endpoint: ChatEndpoint | None = None

    def session(self) -> AppSession:
        from gradio_client import Client

        client = Client(self.url, verbose=False, analytics_enabled=False, download_files=False, ssl_verify=False)
        if self.endpoint is None:
            self.endpoint = ChatEndpoint.from_api_info(client.view_api(print_info=False, return_format="dict"))
        s = AppSession(client, opened=open_session(client))
        if isinstance(getattr(client, "pending_messages_per_event", None), dict):
            hook = _StampingDict(s.stamps)
            hook.update(client.pending_messages_per_event)
            client.pending_messages_per_event = hook
            s.hooked = True
        return s

    def request(self, session: AppSession, text: str, max_tokens: int, expected_prompt_tokens: int | None = None):
        """Send one message and follow its stream; returns a RequestResult (times are perf_counter)."""
        assert self.endpoint is not None
        kwargs = self.endpoint.kwargs(text, max_tokens)
        seen: list[tuple[float, Any]] = []
        submitted = time.perf_counter()
        try:
            job = session.client.submit(api_name=CHAT_API, **kwargs)
            for out in job:
                seen.append((time.perf_counter(), out))
            job.result()  # raises what the server raised
        except Exception as e:
            return RequestResult(expected_prompt_tokens, 0, submitted, None, None, error=f"{type(e).__name__}: {e}")
        finally:
            # gradio_client's close() waits ~1 s on its heartbeat thread: let it, but not the next request.
            threading.Thread(target=session.client.close, daemon=True).start()
        arrivals = [t for t, kind in session.stamps if kind == "process_generating"]
        if session.hooked and len(arrivals) == len(seen):
            updates = [(t, out) for t, (_, out) in zip(arrivals, seen, strict=True)]
            source = "sse-arrival"
        else:
            updates, source = seen, "job-iteration"
        return self._result(updates, submitted, expected_prompt_tokens, source)

    def _result(self, updates, submitted: float, expected_prompt_tokens: int | None, source: str) -> RequestResult:
        ep = self.endpoint
        first = last = None
        first_tokens = tokens = 0
        for t, out in updates:
            n = _field(out, ep.tokens_index)
            if n is None and ep.tokens_index is None:
                n = self._count(out)
            n = int(n or 0)
            if n > tokens:
                if first is None:
                    first, first_tokens = t, n
                last, tokens = t, n
        final = updates[-1][1] if updates else None
        notes = _notes(final)
        error = next((f"{title} {body}".strip() for title, body in notes if title.startswith(("⚠", "❌", "⏳"))), None)
        prompt_tokens = expected_prompt_tokens
        for _, body in notes:
            if m := PROMPT_TOKENS.search(body):
                prompt_tokens = int(m[1])
        ttft, rate = _field(final, ep.ttft_index), _field(final, ep.rate_index)
        result = RequestResult(
            prompt_tokens=prompt_tokens,
            output_tokens=tokens,
            submitted=submitted,
            first=first,
            last=last,
            first_chunk_tokens=max(first_tokens, 1),
            chunks=len(updates),
            engine_ttft_s=float(ttft) if isinstance(ttft, (int, float)) else None,
            engine_decode_tok_s=float(rate) if isinstance(rate, (int, float)) else None,
            error=(error or "no tokens arrived") if tokens == 0 else None,
            timing=source,
        )
        return result

    def _count(self, out: Any) -> int:
        text = "".join(_content_text(m.get("content")) for m in _messages(out) if not (m.get("metadata") or {}))
        if self.tokenizer is None:
            return len(text.split())
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def wait_until_ready(url: str, app: AppProcess, *, timeout_s: float, poll_s: float = 0.5) -> float:
    """Poll /chat with a one-token message until the engine answers; returns the wall time it first did.

    While the engine loads the app answers at once with a "still loading" note, and with a "failed" note
    if it could not start; an exited process or the timeout ends the wait too.
    """
    from gradio_client import Client

    deadline = time.time() + timeout_s
    client = None
    endpoint = None
    while time.time() < deadline:
        if not app.alive():
            raise AppFailed(f"app.py exited with {app.proc.returncode}:\n{app.log_tail()}")
        if client is None:
            try:
                client = Client(url, verbose=False, analytics_enabled=False, download_files=False, ssl_verify=False)
                endpoint = ChatEndpoint.from_api_info(client.view_api(print_info=False, return_format="dict"))
            except AppFailed:
                raise
            except Exception:  # not serving yet
                client = None
                time.sleep(poll_s)
                continue
        asked = time.time()
        try:
            out = client.predict(api_name=CHAT_API, **endpoint.kwargs("hi", 1))
        except Exception as e:
            raise AppFailed(f"{CHAT_API} failed: {type(e).__name__}: {e}\n{app.log_tail()}") from e
        if int(_field(out, endpoint.tokens_index) or 0) > 0:
            client.close()
            return asked
        for title, body in _notes(out):
            if "fail" in title.lower():
                client.close()
                raise AppFailed(f"{title}: {body}\n{app.log_tail()}")
        time.sleep(poll_s)
    if client is not None:
        client.close()
    raise AppFailed(f"the app's engine was not ready after {timeout_s:.0f} s\n{app.log_tail()}")


def run_concurrently(fn, args_list: list[tuple]) -> list[Any]:
    """Run fn(*args) for each args in its own thread, all released at once; results in order."""
    results: list[Any] = [None] * len(args_list)
    barrier = threading.Barrier(len(args_list))

    def work(i: int, args: tuple) -> None:
        barrier.wait()
        results[i] = fn(*args)

    threads = [threading.Thread(target=work, args=(i, a), daemon=True) for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def describe(info: dict[str, Any]) -> str:
    return json.dumps(info.get("named_endpoints", {}).get(CHAT_API, {}), default=str)[:2000]
