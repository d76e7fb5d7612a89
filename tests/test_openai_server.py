"""/v1 on the app's port (engine.openai_server): who may call it, what it answers while the engine loads or failed,
and vLLM's own serving layer behind it.

Most tests run a real Gradio app in this process with the guard installed as app.py installs it. Behind it, vLLM's
real OpenAI-compatible app (build_app + init_app_state of the installed vLLM) runs over a stand-in for AsyncLLM:
the tiny vision checkpoint's real vLLM config, renderer, tokenizer and multimodal processor on the CPU, with a
generate() that answers from a script of token ids (`FakeAsyncLLM`, the test double of the GPU engine;
tests/test_gpu_openai_server.py runs the real one). The engine is a stand-in for VllmEngine whose stage the tests
set (loading, failed, restarted). One test runs the real app.py (transformers backend) in a subprocess.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr
import httpx
import numpy as np
import openai
import pytest
from gradio_client import Client
from PIL import Image

import app as app_module
from chat.ui import launch_options
from engine.base import EngineError, EngineStatus, Stage
from engine.openai_backend import OpenAIEngine
from engine.openai_server import OpenAIServer, bearer_matches, decide_access, is_loopback, vllm_api
from engine.settings import EngineSettings
from tests.app_process import AppProcess, free_port
from tests.tiny_model import TOKEN_ID

KEY = "sk-test-0123456789"
MODEL = "tiny"
TOOL_CALL = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
IMAGE_SOFT_TOKENS = 266  # what the tiny processor makes of a 320x240 image at the default budget (test_vllm_config)


# ------------------------------------------------------------------------------------------- test doubles


class FakeAsyncLLM:
    """vLLM's engine client as far as vLLM's serving layer uses it, on the CPU: the checkpoint's real vLLM config,
    renderer and tokenizer; generate() streams a scripted reply (token ids) and records what it was asked."""

    def __init__(self, vllm_config: Any, renderer: Any):
        self.vllm_config = vllm_config
        self.model_config = vllm_config.model_config
        self.renderer = renderer
        self.input_processor = None
        self.tokenizer = renderer.tokenizer
        self.errored = False
        self.is_running = True
        self.is_stopped = False
        self.dead_error = RuntimeError("the engine died")
        self.replies: list[list[int]] = []
        self.requests: list[tuple[dict[str, Any], Any]] = []  # (prompt, SamplingParams) as vLLM's server sent them
        self.loops: set[asyncio.AbstractEventLoop] = set()  # where it was called: AsyncLLM serves one loop only

    def _called(self) -> None:
        self.loops.add(asyncio.get_running_loop())

    def reply(self, text: str, *, specials: bool = True) -> None:
        """Script the next reply; `specials`: Gemma 4's markers as their special tokens (as the model writes them)."""
        self.replies.append(
            self.tokenizer(text, add_special_tokens=False, split_special_tokens=not specials)["input_ids"]
        )

    async def get_supported_tasks(self) -> tuple[str, ...]:
        self._called()
        return ("generate",)

    async def is_tracing_enabled(self) -> bool:
        self._called()
        return False

    async def check_health(self) -> None:
        self._called()
        return None

    async def do_log_stats(self) -> None:
        self._called()
        return None

    async def abort(self, request_id: Any) -> None:
        self._called()
        return None

    async def generate(self, prompt: dict[str, Any], sampling_params: Any, request_id: str, **kwargs: Any):
        from vllm.outputs import CompletionOutput, RequestOutput
        from vllm.sampling_params import RequestOutputKind

        self._called()
        self.requests.append((prompt, sampling_params))
        ids = self.replies.pop(0) if self.replies else self.tokenizer.encode(" Hello there", add_special_tokens=False)
        delta = sampling_params.output_kind == RequestOutputKind.DELTA
        for i in range(len(ids)):
            last = i == len(ids) - 1
            if not delta and not last:
                continue
            piece = ids[i : i + 1] if delta else ids
            text = self.tokenizer.decode(piece, skip_special_tokens=sampling_params.skip_special_tokens)
            out = CompletionOutput(0, text, piece, None, None, finish_reason="stop" if last else None)
            yield RequestOutput(request_id, None, prompt.get("prompt_token_ids"), None, [out], last)


class FakeVllmEngine:
    """VllmEngine as the guard sees it: its stage (set by the tests) and its current AsyncLLM."""

    name = "vllm"
    model = MODEL

    def __init__(self, llm: FakeAsyncLLM | None):
        self.async_llm = llm
        self.stage = EngineStatus(Stage.READY, "fake")

    def status(self) -> EngineStatus:
        return self.stage


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def vllm_on_cpu(tiny_vision_model_dir: Path) -> Iterator[tuple[Any, Any]]:
    """The tiny vision checkpoint's vLLM config and renderer, made on the CPU; vLLM's argument parser (which the
    serving layer's arguments come from) is told the device is the CPU, as on a GPU machine it finds CUDA."""
    from vllm.config import DeviceConfig, VllmConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.platforms import current_platform
    from vllm.renderers import renderer_from_config

    video = {"count": 1, "num_frames": 32}
    args = AsyncEngineArgs(
        model=str(tiny_vision_model_dir), max_model_len=4096, limit_mm_per_prompt={"image": 8, "video": video}
    )
    config = VllmConfig(model_config=args.create_model_config(), device_config=DeviceConfig(device="cpu"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(current_platform, "device_type", "cpu", raising=False)
        yield config, renderer_from_config(config)


@contextmanager
def serving(api: OpenAIServer, auth: list[tuple[str, str]] | None = None) -> Iterator[str]:
    """A Gradio app with a queued event (`/reverse`), launched as app.py launches its own, guard included."""
    with gr.Blocks(analytics_enabled=False) as demo:
        box = gr.Textbox()
        box.submit(lambda text: text[::-1], box, box, api_name="reverse")
    demo.queue()
    demo.launch(
        server_name="127.0.0.1",
        server_port=free_port(),
        prevent_thread_lock=True,
        auth=auth,
        quiet=True,
        **api.launch_options(launch_options()),
    )
    try:
        yield demo.local_url.rstrip("/")
    finally:
        demo.close()


LOCAL_WITH_KEY = decide_access(key=KEY, no_api=False, host="127.0.0.1", share=False, login=False)


@pytest.fixture(scope="module")
def server(vllm_on_cpu) -> Iterator[tuple[OpenAIServer, str]]:
    api = OpenAIServer(FakeVllmEngine(FakeAsyncLLM(*vllm_on_cpu)), LOCAL_WITH_KEY)
    with serving(api) as url:
        yield api, url


@pytest.fixture
def v1(server) -> Iterator[tuple[OpenAIServer, str]]:
    """The module's app as each test starts it: the key required, the engine ready, its script empty."""
    api, url = server
    engine = api.engine
    llm, stage = engine.async_llm, engine.stage
    llm.replies.clear()
    llm.requests.clear()
    yield api, url
    api.access, api.engine = LOCAL_WITH_KEY, engine
    engine.async_llm, engine.stage = llm, stage


def bearer(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def wait_attached(api: OpenAIServer, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not api.attached and time.monotonic() < deadline:
        time.sleep(0.05)
    assert api.attached, "vLLM's routes were not attached"


def png_bytes() -> bytes:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def image_question(url: str) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}],
        }
    ]


# ------------------------------------------------------------------------------------------- the rules


def test_v1_is_on_for_this_machine_only_without_a_key():
    access = decide_access(key=None, no_api=False, host="127.0.0.1", share=False, login=False)
    assert access.served and not access.key_required and access.local_only


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        ({"share": True}, "--share makes this app public"),
        ({"host": "0.0.0.0"}, "--host 0.0.0.0 serves it beyond this machine"),
        ({"host": "192.168.1.20"}, "--host 192.168.1.20 serves it beyond this machine"),
        ({"host": "gpu-box"}, "--host gpu-box serves it beyond this machine"),
        ({"login": True}, "the page's login (--auth) does not cover /v1"),
    ],
)
def test_sharing_a_public_host_or_a_login_without_a_key_turn_v1_off(flags, said):
    access = decide_access(
        **({"key": None, "no_api": False, "host": "127.0.0.1", "share": False, "login": False} | flags)
    )
    assert not access.served
    assert said in access.off and "--api-key KEY (or --api-key-file FILE)" in access.off


def test_a_key_turns_v1_on_however_the_app_is_reached():
    access = decide_access(key=KEY, no_api=False, host="0.0.0.0", share=True, login=True)
    assert access.served and access.key_required and not access.local_only
    assert KEY not in repr(access)  # the key stays out of logs and tracebacks


def test_no_api_turns_v1_off_whatever_the_key():
    access = decide_access(key=KEY, no_api=True, host="127.0.0.1", share=False, login=False)
    assert not access.served and access.off == "/v1 is off (--no-api)"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("localhost", True),
        ("::1", True),
        ("127.0.0.5", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("spark", False),
    ],
)
def test_only_loopback_hosts_count_as_this_machine(host, loopback):
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        (f"Bearer {KEY}", True),
        (f"bearer {KEY}", True),
        (None, False),
        ("", False),
        ("Bearer ", False),
        (f"Bearer {KEY}x", False),
        (f"Bearer {KEY[:-1]}", False),
        (f"Basic {KEY}", False),
        (KEY, False),
    ],
)
def test_the_bearer_key_must_match_whole(header, ok):
    assert bearer_matches(header, KEY) is ok


def test_vllm_api_is_found_where_this_vllm_keeps_it_and_the_log_stays_as_it_was():
    root = logging.getLogger()
    before = root.level
    api = vllm_api()  # vLLM 0.26: vllm.entrypoints.openai; 0.29 moves them to vllm.entrypoints.launchers
    assert root.level == before  # importing vLLM's API server set it to ERROR (SageMaker's logging config)
    from vllm.entrypoints.openai import api_server, cli_args

    assert (api.build_app, api.init_app_state) == (api_server.build_app, api_server.init_app_state)
    assert api.make_arg_parser is cli_args.make_arg_parser


def test_from_vllm_0_29_its_launchers_modules_are_tried_first(monkeypatch):
    from engine import openai_server

    found = {
        "vllm.entrypoints.launchers.app_state": SimpleNamespace(build_app="new build_app", init_app_state="new init"),
        "vllm.entrypoints.launchers.cli_args": SimpleNamespace(
            make_arg_parser="new parser", validate_parsed_serve_args=0
        ),
    }

    def import_module(name: str) -> SimpleNamespace:
        if name not in found:
            raise ImportError(name)
        return found[name]

    monkeypatch.setattr(openai_server.importlib, "import_module", import_module)
    monkeypatch.setattr(openai_server.importlib.metadata, "version", lambda name: "0.29.1rc1.dev7+g0123abc")
    api = vllm_api()
    assert (api.build_app, api.init_app_state, api.make_arg_parser) == ("new build_app", "new init", "new parser")
    found.clear()
    with pytest.raises(EngineError, match="needs to learn where this vLLM keeps them"):
        vllm_api()


@pytest.mark.parametrize(
    ("argv", "level", "line"),
    [
        (["--host", "0.0.0.0"], logging.WARNING, "/v1 is off: --host 0.0.0.0 serves it beyond this machine"),
        (["--share"], logging.WARNING, "/v1 is off: --share makes this app public"),
        (["--no-api"], logging.INFO, "/v1 is off (--no-api)"),
        (
            ["--api-key", KEY],
            logging.INFO,
            "OpenAI-compatible API (vLLM's routes) at http://127.0.0.1:7860/v1 (Bearer key required)",
        ),
        (
            [],
            logging.INFO,
            "OpenAI-compatible API (vLLM's routes) at http://127.0.0.1:7860/v1 (no key: for this machine only)",
        ),
    ],
)
def test_the_log_says_where_v1_is_or_why_it_is_off(argv, level, line, caplog):
    api = OpenAIServer(FakeVllmEngine(None), app_module.api_access(app_module.parse_args(argv)))
    with caplog.at_level(logging.INFO, logger="engine.openai_server"):
        api.log_status("http://127.0.0.1:7860/", None)
    [record] = caplog.records
    assert record.levelno == level and record.getMessage().startswith(line)


def test_the_sidebar_shows_the_url_and_copyable_clients_but_never_the_key():
    api = OpenAIServer(FakeVllmEngine(None), LOCAL_WITH_KEY)
    text = api.sidebar_markdown("https://abc.gradio.live/")
    assert "**OpenAI-compatible API** at `https://abc.gradio.live/v1`" in text and KEY not in text
    assert "```bash\ncurl https://abc.gradio.live/v1/chat/completions" in text
    code = api.snippets("https://abc.gradio.live/")
    words = shlex.split(code["curl"].replace("\\\n", " "))
    assert words[words.index("-H") + 1] == "Authorization: Bearer $GEMMA4_API_KEY"
    assert json.loads(words[words.index("-d") + 1])["model"] == MODEL
    compile(code["python"], "snippet", "exec")  # it is Python
    assert 'OpenAI(base_url="https://abc.gradio.live/v1", api_key=os.environ["GEMMA4_API_KEY"])' in code["python"]
    # Without a key (this machine only) the snippets send none.
    open_api = OpenAIServer(
        FakeVllmEngine(None), decide_access(key=None, no_api=False, host="127.0.0.1", share=False, login=False)
    )
    assert "Authorization" not in open_api.snippets("http://127.0.0.1:7860")["curl"]
    assert 'api_key="EMPTY"' in open_api.snippets("http://127.0.0.1:7860")["python"]
    assert "no key: this machine only" in open_api.sidebar_markdown("http://127.0.0.1:7860")
    # Off, it says why; on another backend, which one /v1 needs.
    off = OpenAIServer(
        FakeVllmEngine(None), decide_access(key=None, no_api=False, host="0.0.0.0", share=False, login=False)
    )
    assert off.sidebar_markdown("http://x:7860").startswith("**OpenAI-compatible API**: /v1 is off: --host 0.0.0.0")
    remote = OpenAIEngine(EngineSettings(backend="openai", base_url="http://spark:8000/v1"))
    assert "http://spark:8000/v1" in OpenAIServer(remote, LOCAL_WITH_KEY).sidebar_markdown("http://x:7860")


# ------------------------------------------------------------------------------------------- the guard, in a Gradio app


def test_without_the_key_or_with_a_wrong_one_v1_and_health_answer_401(v1):
    api, url = v1
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
    for headers in ({}, bearer("wrong"), {"Authorization": f"Basic {KEY}"}, {"Authorization": KEY}):
        for method, path, body in (
            ("GET", "/v1/models", None),
            ("POST", "/v1/chat/completions", chat),
            ("GET", "/health", None),
        ):
            response = httpx.request(method, url + path, headers=headers, json=body)
            assert response.status_code == 401, (headers, path)
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["error"]["type"] == "authentication_error"
    assert api.engine.async_llm.requests == []  # nothing reached the engine
    with pytest.raises(openai.AuthenticationError):
        client(url, "wrong").models.list()


def test_with_the_key_vllm_lists_the_model_and_health_is_200(v1):
    api, url = v1
    models = client(url).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(f"{url}/health", headers=bearer()).status_code == 200


def test_a_chat_streams_through_vllms_serving_layer(v1):
    api, url = v1
    api.engine.async_llm.reply(" Hello from the tiny model")
    stream = client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True)
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert "".join(pieces) == " Hello from the tiny model" and len([p for p in pieces if p]) > 3
    prompt, params = api.engine.async_llm.requests[0]
    # vLLM rendered the model's own chat template (thinking off: the closed channel ends the prompt).
    assert prompt["prompt"].endswith("<|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")
    assert len(api.engine.async_llm.loops) == 1  # building the routes and serving them: one loop, the server's


def test_completions_answer_too(v1):
    api, url = v1
    api.engine.async_llm.reply(" world")
    assert client(url).completions.create(model=MODEL, prompt="Hello").choices[0].text == " world"


def test_a_tool_call_comes_back_as_openai_tool_calls(v1):
    api, url = v1
    llm = api.engine.async_llm
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER_TOOL]}
    llm.reply(TOOL_CALL)
    message = client(url).chat.completions.create(**ask).choices[0].message
    assert message.content is None
    [call] = message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    # Streamed: the name first, then the arguments in pieces, finish_reason tool_calls.
    llm.reply(TOOL_CALL)
    chunks = [c for c in client(url).chat.completions.create(**ask, stream=True) if c.choices]
    calls = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert calls[0].function.name == "get_weather"
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks)


def test_a_forced_tool_call_reaches_the_engine_as_asked(v1):
    """What the GPU test sends to make the random model write a tool call: structured outputs (a regex) and the
    tokens it may use. vLLM's gemma4 tool parser must leave both in place for tool_choice auto."""
    api, url = v1
    llm = api.engine.async_llm
    allowed = [TOKEN_ID["<|tool_call>"], TOKEN_ID["<tool_call|>"], TOKEN_ID['<|"|>'], TOKEN_ID["<eos>"], 100, 101]
    extra = {"structured_outputs": {"regex": "<\\|tool_call>call:get_weather.*"}, "allowed_token_ids": allowed}
    llm.reply(TOOL_CALL)
    response = client(url).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather?"}],
        tools=[WEATHER_TOOL],
        extra_body=extra,
        temperature=0,
    )
    assert response.choices[0].message.tool_calls[0].function.name == "get_weather"
    _, params = llm.requests[0]
    assert params.structured_outputs.regex == extra["structured_outputs"]["regex"]
    assert params.allowed_token_ids == allowed and params.skip_special_tokens is False


def test_an_image_by_data_url_or_file_url_reaches_the_engine_expanded(v1, tmp_path):
    api, url = v1
    llm = api.engine.async_llm
    path = tmp_path / "noise.png"
    path.write_bytes(png_bytes())
    data_url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is this?"}])
    for image_url in (data_url, path.as_uri()):
        client(url).chat.completions.create(model=MODEL, messages=image_question(image_url))
    text_only, *with_image = [prompt["prompt_token_ids"] for prompt, _ in llm.requests]
    assert [ids.count(TOKEN_ID["<|image|>"]) for ids in with_image] == [IMAGE_SOFT_TOKENS] * 2
    # The image's soft tokens and its <|image> ... <image|> markers; the GPU test expects the same.
    assert [len(ids) - len(text_only) for ids in with_image] == [IMAGE_SOFT_TOKENS + 2] * 2


def test_file_urls_are_refused_when_others_can_reach_v1(v1, tmp_path, vllm_on_cpu):
    api, url = v1
    path = tmp_path / "noise.png"
    path.write_bytes(png_bytes())
    api.access = decide_access(key=KEY, no_api=False, host="0.0.0.0", share=False, login=False)
    api.engine.async_llm = FakeAsyncLLM(*vllm_on_cpu)  # routes are built per engine: these under the new rules
    wait_attached(api)
    with pytest.raises(openai.APIStatusError) as refused:
        client(url).chat.completions.create(model=MODEL, messages=image_question(path.as_uri()))
    assert "allowed-local-media-path" in str(refused.value) and api.engine.async_llm.requests == []
    data_url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    client(url).chat.completions.create(model=MODEL, messages=image_question(data_url))  # data URLs still work
    assert len(api.engine.async_llm.requests) == 1


@pytest.mark.parametrize(
    ("stage", "detail", "progress"),
    [
        (Stage.DOWNLOADING, "model-00001-of-00003.safetensors", 0.25),
        (Stage.LOADING, "loading weights", None),
        (Stage.COMPILING, "KV cache sized; capturing CUDA graphs", None),
    ],
)
def test_while_the_engine_loads_v1_answers_503_with_the_stage(v1, stage, detail, progress):
    api, url = v1
    api.engine.stage = EngineStatus(stage, detail, progress)
    for path in ("/v1/models", "/health"):
        response = httpx.get(url + path, headers=bearer())
        assert response.status_code == 503 and response.headers["retry-after"] == "5"
        error = response.json()["error"]
        assert (error["type"], error["stage"], error["detail"], error["progress"]) == (
            "engine_loading",
            stage.value,
            detail,
            progress,
        )
        assert error["message"] == f"The engine is still loading: {stage.value} ({detail})"
    with pytest.raises(openai.InternalServerError, match="still loading"):
        client(url).models.list()


def test_a_failed_engine_answers_503_with_the_reason(v1):
    api, url = v1
    api.engine.stage = EngineStatus(Stage.FAILED, "CUDA out of memory")
    response = httpx.post(f"{url}/v1/chat/completions", headers=bearer(), json={"model": MODEL, "messages": []})
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["type"] == "engine_failed" and error["message"].startswith("The engine failed: CUDA out of memory.")


def test_a_restart_attaches_the_routes_to_the_new_engine(v1, vllm_on_cpu):
    api, url = v1
    wait_attached(api)
    api.engine.async_llm = None  # shut down, the new one not started yet: the stage still says ready
    response = httpx.get(f"{url}/v1/models", headers=bearer())
    assert response.status_code == 503 and response.json()["error"]["stage"] == "restarting"
    assert not api.attached  # the old engine's routes are let go at once
    api.engine.stage = EngineStatus(Stage.LOADING, "starting vLLM")
    restarted = FakeAsyncLLM(*vllm_on_cpu)
    api.engine.async_llm = restarted
    assert httpx.get(f"{url}/v1/models", headers=bearer()).status_code == 503
    api.engine.stage = EngineStatus(Stage.READY, "fake")
    wait_attached(api)  # by the watcher, before any request asks
    restarted.reply(" after the restart")
    assert (
        client(url)
        .chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
        .choices[0]
        .message.content
        == " after the restart"
    )
    assert len(restarted.requests) == 1


def test_v1_turned_off_says_why_and_the_page_still_serves(v1):
    api, url = v1
    api.access = decide_access(key=None, no_api=False, host="0.0.0.0", share=False, login=False)
    response = httpx.get(f"{url}/v1/models", headers=bearer())
    assert response.status_code == 403 and response.json()["error"]["message"].startswith("/v1 is off: --host 0.0.0.0")
    api.access = decide_access(key=KEY, no_api=True, host="127.0.0.1", share=False, login=False)
    for path in ("/v1/models", "/health"):
        response = httpx.get(url + path, headers=bearer())
        assert (response.status_code, response.json()["error"]["message"]) == (404, "/v1 is off (--no-api)")
    assert httpx.get(url + "/").status_code == 200
    assert api.engine.async_llm.requests == []


def test_other_backends_answer_501_naming_what_to_call_instead(v1):
    api, url = v1
    api.engine = OpenAIEngine(EngineSettings(model=MODEL, backend="openai", base_url="http://spark:8000/v1"))
    response = httpx.get(f"{url}/v1/models", headers=bearer())
    assert response.status_code == 501
    error = response.json()["error"]
    assert error["server"] == "http://spark:8000/v1" and "call that server's /v1 directly" in error["message"]
    assert httpx.get(f"{url}/v1/models").status_code == 401  # the key first: nothing is said without it


def test_a_page_of_another_site_cannot_use_v1_without_a_key(v1):
    api, url = v1
    api.access = decide_access(key=None, no_api=False, host="127.0.0.1", share=False, login=False)
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]})
    evil = {"Origin": "https://evil.example"}
    # JSON needs a preflight, which Gradio's CORS answers without allowing that origin; a "simple" text/plain
    # request goes through, but vLLM reads JSON bodies only.
    preflight = httpx.options(
        f"{url}/v1/chat/completions",
        headers=evil | {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"},
    )
    assert "access-control-allow-origin" not in preflight.headers
    simple = httpx.post(f"{url}/v1/chat/completions", headers=evil | {"Content-Type": "text/plain"}, content=body)
    assert simple.status_code in (400, 422) and "access-control-allow-origin" not in simple.headers
    assert api.engine.async_llm.requests == []


def test_gradios_page_api_and_queue_work_beside_v1(v1):
    api, url = v1
    assert "<html" in httpx.get(url + "/").text.lower()
    gradio = Client(url + "/", verbose=False)
    try:
        assert gradio.predict("abc", api_name="/reverse") == "cba"
    finally:
        gradio.close()
    assert httpx.get(url + "/v1x").status_code == 404  # only /v1 and /health are the guard's
    assert httpx.get(url + "/docs").status_code == 404  # vLLM's other routes are not served


def test_the_page_login_does_not_open_v1_and_the_key_does_not_open_the_page(vllm_on_cpu):
    api = OpenAIServer(
        FakeVllmEngine(FakeAsyncLLM(*vllm_on_cpu)),
        decide_access(key=KEY, no_api=False, host="127.0.0.1", share=False, login=True),
    )
    with serving(api, auth=[("ann", "pw")]) as url, httpx.Client(base_url=url) as browser:
        assert browser.post("/login", data={"username": "ann", "password": "pw"}).status_code == 200
        assert browser.get("/config").status_code == 200  # logged in: the page's own routes answer
        assert browser.get("/v1/models").status_code == 401  # the login cookie alone doesn't open /v1
        assert browser.get("/v1/models", headers=bearer()).status_code == 200
        assert httpx.get(f"{url}/config", headers=bearer()).status_code == 401  # nor the key the page


# ------------------------------------------------------------------------------------------- the real app.py


@pytest.fixture(scope="module")
def transformers_app(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppProcess]:
    tmp = tmp_path_factory.mktemp("openai-server")
    key_file = tmp / "api-key"
    key_file.write_text(f"\n{KEY}\n")
    process = AppProcess(tiny_model_dir, tmp, "--auth", "ann:pw", "--api-key-file", str(key_file))
    try:
        yield process.wait_ready()
    finally:
        process.stop()


def test_the_real_app_guards_v1_and_answers_501_for_the_transformers_backend(transformers_app: AppProcess):
    url = transformers_app.url.rstrip("/")
    line = "/v1 answers 501: /v1 needs the vllm backend: this app runs --backend transformers"
    deadline = time.monotonic() + 30  # logged once the server is up, which is when wait_ready returns
    while line not in transformers_app.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert line in transformers_app.log_text()
    assert httpx.get(f"{url}/v1/models").status_code == 401
    with httpx.Client(base_url=url) as browser:
        assert browser.post("/login", data={"username": "ann", "password": "pw"}).status_code == 200
        assert browser.get("/v1/models").status_code == 401
    response = httpx.get(f"{url}/v1/models", headers=bearer())
    assert response.status_code == 501 and "start it with --backend vllm" in response.json()["error"]["message"]
    # The chat still works beside it.
    chat = transformers_app.client(("ann", "pw"))
    try:
        assert chat.predict({"text": "Hi", "files": []}, max_tokens=3, api_name="/chat")[3] == 3
    finally:
        chat.close()
