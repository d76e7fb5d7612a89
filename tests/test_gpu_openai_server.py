"""/v1 of the app over a real VllmEngine (engine.openai_server): vLLM's own OpenAI-compatible routes on the page's
port, over the same AsyncLLM the page's chat uses, driven with the openai client.

The app here is the real UI (build_ui) launched in this process as app.py launches it, guard included, on the tiny
vision checkpoint. Run on the device machine: `python -m pytest -m gpu tests/test_gpu_openai_server.py -s`; it
prints TTFT and tok/s as the clients saw them.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from gradio_client import Client
from PIL import Image

from engine import lifecycle
from engine.base import Stage
from engine.openai_server import OpenAIServer, decide_access
from engine.settings import EngineSettings
from engine.vllm_backend import VllmEngine
from tests.tiny_model import TOKEN_ID

pytestmark = pytest.mark.gpu

KEY = "sk-gpu-test"
START_TIMEOUT_S = 900
STREAM_TOKENS = 2000  # long enough that the page's chat runs inside it
TOOL_CALL_REGEX = r'<\|tool_call>call:get_weather\{city:<\|"\|>Paris<\|"\|>\}<tool_call\|>'
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


@pytest.fixture(scope="module")
def app(tiny_vision_model_dir: Path) -> Iterator[tuple[VllmEngine, OpenAIServer, str]]:
    from chat.ui import build_ui, launch_options

    settings = EngineSettings(model=str(tiny_vision_model_dir), max_model_len=4096, gpu_memory_utilization=0.3)
    engine = VllmEngine(settings)
    api = OpenAIServer(engine, decide_access(key=KEY, no_api=False, host="127.0.0.1", share=False, login=False))
    demo = build_ui(engine, settings)
    demo.queue(default_concurrency_limit=settings.max_num_seqs)
    demo.launch(
        server_name="127.0.0.1",
        server_port=free_port(),
        prevent_thread_lock=True,
        quiet=True,
        **api.launch_options(launch_options()),
    )
    lifecycle.start_in_background(engine)  # as app.py: the server is up first, the engine loads behind it
    url = demo.local_url.rstrip("/")
    try:
        response = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        if engine.status().stage is not Stage.READY:  # almost surely: the load takes seconds
            assert response.status_code == 503 and response.json()["error"]["type"] == "engine_loading"
            print(f"\nwhile loading: 503 {response.json()['error']['message']}")
        wait_until(lambda: engine.status().ready or engine.status().failed, START_TIMEOUT_S, "engine start")
        assert engine.status().ready, engine.status().detail
        wait_until(lambda: api.attached, 120, "the /v1 routes attached")
        yield engine, api, url
    finally:
        demo.close()
        asyncio.run(engine.shutdown())


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=300)


def test_a_wrong_or_missing_key_gets_401_and_the_key_gets_vllms_answers(app):
    engine, api, url = app
    with pytest.raises(openai.AuthenticationError):
        client(url, "wrong").models.list()
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/health").status_code == 401
    assert [m.id for m in client(url).models.list().data] == [engine.model]
    assert httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    completion = client(url).completions.create(model=engine.model, prompt="Hello", max_tokens=8)
    assert completion.usage.completion_tokens >= 1


def test_a_v1_stream_and_a_page_chat_run_at_once_on_one_engine(app):
    engine, api, url = app
    times: list[float] = []  # when each content chunk arrived
    usage = []
    done = threading.Event()

    def stream() -> None:
        try:
            response = client(url).chat.completions.create(
                model=engine.model,
                messages=[{"role": "user", "content": "Tell me a long story."}],
                max_tokens=STREAM_TOKENS,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            for chunk in response:
                if chunk.choices and chunk.choices[0].delta.content:
                    times.append(time.perf_counter())
                if chunk.usage is not None:
                    usage.append(chunk.usage)
        finally:
            done.set()

    thread = threading.Thread(target=stream, name="v1-stream")
    start = time.perf_counter()
    thread.start()
    wait_until(lambda: len(times) > 20 or done.is_set(), 120, "the /v1 stream's first tokens")
    assert not done.is_set(), "the /v1 stream ended early"
    running = []
    watch = threading.Event()

    def watch_engine() -> None:
        while not watch.is_set():
            running.append(engine.stats().running or 0)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch_engine, name="engine-stats")
    watcher.start()
    page = Client(url + "/", verbose=False)
    try:
        messages, ttft, tok_s, tokens = page.predict({"text": "Hi", "files": []}, max_tokens=200, api_name="/chat")
    finally:
        page.close()
    assert not done.is_set(), "the /v1 stream ended before the page's chat: they did not overlap"
    thread.join(timeout=300)
    watch.set()
    watcher.join()
    assert tokens >= 1 and ttft > 0
    [used] = usage
    assert used.completion_tokens == STREAM_TOKENS
    v1_ttft = times[0] - start
    v1_rate = (used.completion_tokens - 1) / (times[-1] - times[0])  # as the app counts it: after the first token
    print(
        f"\n/v1 stream: TTFT {v1_ttft * 1000:.1f} ms (the client's clock, HTTP included), {v1_rate:.0f} tok/s "
        f"over {used.completion_tokens} tokens in {len(times)} chunks; the page's chat meanwhile: TTFT "
        f"{ttft * 1000:.1f} ms, {tok_s:.0f} tok/s, {tokens} tokens; vLLM ran up to {max(running)} requests at once"
    )
    assert max(running) >= 2, "vLLM never ran the two requests at once"


def allowed_for_tool_call(tokenizer) -> list[int]:
    """Tokens the forced tool call may use: Gemma 4's markers as their special tokens (vLLM's gemma4 parser reads
    them by id when streaming), text tokens without the markers' characters, and the end-of-turn ids."""
    markers = [TOKEN_ID[t] for t in ("<|tool_call>", "<tool_call|>", '<|"|>', "<eos>", "<turn|>")]
    plain = [i for i in range(len(tokenizer)) if not set(tokenizer.decode([i])) & set('<|>"') and i not in markers]
    return markers + plain


def test_a_tool_call_comes_back_as_openai_tool_calls(app):
    """The random tiny model writes a tool call only when made to: vLLM's structured outputs (a regex of Gemma 4's
    tool-call syntax, `<|tool_call>call:NAME{KEY:<|"|>VALUE<|"|>}<tool_call|>`, as vllm/parser/gemma4.py parses
    it) with the markers' special tokens as the only way to write them."""
    engine, api, url = app
    tokenizer = engine.async_llm.get_tokenizer()
    ask = {
        "model": engine.model,
        "messages": [{"role": "user", "content": "What's the weather in Paris?"}],
        "tools": [WEATHER_TOOL],
        "temperature": 0,
        "max_tokens": 64,
        "extra_body": {
            "structured_outputs": {"regex": TOOL_CALL_REGEX},
            "allowed_token_ids": allowed_for_tool_call(tokenizer),
        },
    }
    start = time.perf_counter()
    choice = client(url).chat.completions.create(**ask).choices[0]
    took = time.perf_counter() - start
    [call] = choice.message.tool_calls
    assert choice.finish_reason == "tool_calls"
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    chunks = [c for c in client(url).chat.completions.create(**ask, stream=True) if c.choices]
    calls = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert calls[0].function.name == "get_weather"
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    print(
        f"\ntool call: {call.function.name}({call.function.arguments}) in {took * 1000:.0f} ms; "
        f"streamed in {len(chunks)} chunks"
    )


def test_an_image_by_data_url_or_file_url_is_answered(app, tmp_path):
    engine, api, url = app
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    path = tmp_path / "noise.png"
    path.write_bytes(buffer.getvalue())
    data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    text_only = client(url).chat.completions.create(
        model=engine.model, messages=[{"role": "user", "content": "What is this?"}], max_tokens=4
    )
    for image_url in (data_url, path.as_uri()):
        content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": image_url}}]
        answer = client(url).chat.completions.create(
            model=engine.model, messages=[{"role": "user", "content": content}], max_tokens=4
        )
        added = answer.usage.prompt_tokens - text_only.usage.prompt_tokens
        print(
            f"\nimage by {image_url.split(':')[0]} URL: +{added} prompt tokens, "
            f"{answer.usage.completion_tokens} tokens out"
        )
        assert added == 266 + 2  # the image's soft tokens and its two markers, as on the CPU and through the page


def test_after_a_restart_v1_serves_the_new_engine(app):
    engine, api, url = app
    old = engine.async_llm
    assert lifecycle.restart_in_background(engine) is not None
    wait_until(lambda: engine.async_llm is not old and engine.status().ready, START_TIMEOUT_S, "the restart")
    wait_until(lambda: api.attached, 120, "the /v1 routes attached again")
    answer = client(url).chat.completions.create(
        model=engine.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=8
    )
    assert answer.usage.completion_tokens >= 1
    print(f"\nafter the restart: {answer.usage.completion_tokens} tokens from the new AsyncLLM")
