"""OpenAIEngine against a stand-in OpenAI-compatible server on 127.0.0.1.

The stand-in streams Server-Sent Events in the chat.completions format. Its replies come from a
TransformersEngine on the tiny Gemma 4 (real tokens, real timing), or from a script of deltas for the
cases a random model cannot be made to show: the reasoning fields and the usage chunk.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from PIL import Image

from engine.base import Delta, Engine, EngineError, GenerationRequest, SamplingOptions, Stage
from engine.openai_backend import OpenAIEngine, chat_params
from engine.settings import EngineSettings
from engine.transformers_backend import TransformersEngine
from media import VideoClip
from tests.test_transformers_backend import LONG, endless_copy, eventually


class StandIn:
    """An OpenAI-compatible server with its own event loop in a thread, like a real one in another process."""

    def __init__(self, engine: TransformersEngine, served: tuple[str, ...] = ("tiny",)):
        self.engine = engine
        self.served = served
        self.bodies: list[dict[str, Any]] = []  # every chat request as it arrived
        self.script: list[dict[str, Any]] | None = None  # deltas to send instead of the engine's
        self.usage = True  # answer stream_options.include_usage with a usage chunk
        self.script_completion_tokens = 0  # what the usage chunk claims for a scripted reply
        self.reject: tuple[int, str] | None = None  # answer chat requests with this HTTP status and message
        self.key: str | None = None  # the Bearer key GET /models requires, as a server started with --api-key
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        self._runner = web.AppRunner(app)
        self._loop = asyncio.new_event_loop()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self._sock.getsockname()[1]}/v1"
        self._thread = threading.Thread(target=self._loop.run_forever, name="stand-in-server", daemon=True)

    def __enter__(self) -> StandIn:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result()
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    async def _serve(self) -> None:
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock).start()

    async def models(self, request: web.Request) -> web.Response:
        if self.key is not None and request.headers.get("Authorization") != f"Bearer {self.key}":
            return web.json_response({"error": {"message": "Unauthorized", "type": "Unauthorized"}}, status=401)
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "test"} for name in self.served]
        return web.json_response({"object": "list", "data": data})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if self.reject is not None:
            status, message = self.reject
            return web.json_response({"error": {"message": message, "type": "BadRequestError"}}, status=status)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            await self._stream(body, response)
        except ConnectionResetError:  # the client went away (abort); the engine's stream was closed on the way out
            pass
        return response

    async def _stream(self, body: dict[str, Any], response: web.StreamResponse) -> None:
        async def send(choices: list[dict[str, Any]], **extra: Any) -> None:
            event = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": body["model"]}
            await response.write(f"data: {json.dumps(event | {'choices': choices} | extra)}\n\n".encode())

        async def send_delta(delta: dict[str, Any], finish: str | None = None) -> None:
            await send([{"index": 0, "delta": delta, "finish_reason": finish}])

        await send_delta({"role": "assistant", "content": ""})
        if self.script is not None:
            for delta in self.script:
                await send_delta(delta)
            await send_delta({}, "stop")
            prompt_tokens, completion_tokens = 7, self.script_completion_tokens
        else:
            async with contextlib.aclosing(self.engine.generate(as_request(body))) as deltas:
                async for delta in deltas:
                    fields = {"reasoning": delta.reasoning, "content": delta.text}
                    await send_delta({k: v for k, v in fields.items() if v}, delta.finish_reason)
            prompt_tokens, completion_tokens = delta.metrics.prompt_tokens, delta.metrics.output_tokens
        if self.usage and body.get("stream_options", {}).get("include_usage"):
            total = prompt_tokens + completion_tokens
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}
            await send([], usage=usage)
        await response.write(b"data: [DONE]\n\n")


def as_request(body: dict[str, Any]) -> GenerationRequest:
    """What vLLM's server would make of the body."""
    sampling = SamplingOptions(
        temperature=body["temperature"],
        top_p=body["top_p"],
        top_k=body.get("top_k", 0),
        max_tokens=body["max_completion_tokens"],
        repetition_penalty=body["repetition_penalty"],
        presence_penalty=body["presence_penalty"],
        seed=body.get("seed"),
    )
    thinking = body["chat_template_kwargs"]["enable_thinking"]
    return GenerationRequest(body["messages"], sampling, enable_thinking=thinking)


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir, tmp_path_factory) -> Iterator[TransformersEngine]:
    """The server's model: the tiny Gemma 4, endless so that only max_tokens or abort ends a reply."""
    checkpoint = endless_copy(tiny_model_dir, tmp_path_factory.mktemp("endless") / "tiny")
    engine = TransformersEngine(EngineSettings(model=str(checkpoint), backend="transformers"))
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.shutdown())


@pytest.fixture
def server(tiny_engine) -> Iterator[StandIn]:
    with StandIn(tiny_engine, served=("tiny", "other")) as server:
        yield server


async def started(base_url: str, model: str = "tiny") -> OpenAIEngine:
    engine = OpenAIEngine(EngineSettings(model=model, backend="openai", base_url=base_url))
    # On an event loop of its own, as the app starts the engine beside Gradio's loop.
    await asyncio.to_thread(asyncio.run, engine.start())
    return engine


def chat(text: str, **sampling) -> GenerationRequest:
    return GenerationRequest([{"role": "user", "content": text}], SamplingOptions(**sampling))


async def reply(engine: Engine, request: GenerationRequest) -> tuple[str, str, list[Delta]]:
    deltas = [delta async for delta in engine.generate(request)]
    return "".join(d.reasoning for d in deltas), "".join(d.text for d in deltas), deltas


async def test_a_streamed_reply_is_the_servers_text_with_client_side_metrics(server, tiny_engine):
    engine = await started(server.base_url)
    assert isinstance(engine, Engine)
    assert engine.status().stage is Stage.READY and engine.status().detail == f"tiny at {server.base_url}"

    reasoning, text, deltas = await reply(engine, chat("Tell me about the river.", temperature=0, max_tokens=40))
    direct = await reply(tiny_engine, chat("Tell me about the river.", temperature=0, max_tokens=40))

    assert (reasoning, text) == direct[:2]
    assert deltas[-1].finish_reason == direct[2][-1].finish_reason
    metrics, served = deltas[-1].metrics, direct[2][-1].metrics
    assert (metrics.prompt_tokens, metrics.output_tokens) == (served.prompt_tokens, served.output_tokens)
    assert metrics.ttft_s > 0 and metrics.decode_tok_s > 0
    await engine.shutdown()


async def test_sampling_and_thinking_travel_as_vllm_reads_them(server):
    engine = await started(server.base_url)
    request = GenerationRequest(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        SamplingOptions(
            temperature=0.6, top_p=0.9, top_k=20, max_tokens=3, repetition_penalty=1.1, presence_penalty=0.2, seed=5
        ),
        enable_thinking=True,
    )
    await reply(engine, request)
    body = server.bodies[-1]
    assert body["model"] == "tiny" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == request.messages
    expected = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_completion_tokens": 3, "repetition_penalty": 1.1,
                "presence_penalty": 0.2, "seed": 5, "chat_template_kwargs": {"enable_thinking": True},
                "skip_special_tokens": False}  # fmt: skip
    assert {k: body[k] for k in expected} == expected
    await engine.shutdown()


def test_top_k_off_and_no_seed_are_left_to_the_server():
    params = chat_params(chat("hi", top_k=0), "m")
    assert "top_k" not in params["extra_body"] and "seed" not in params


def decode_data_url(url: str) -> Image.Image:
    header, data = url.split(",", 1)
    assert header == "data:image/jpeg;base64"
    return Image.open(io.BytesIO(base64.b64decode(data)))


async def test_images_go_as_data_urls_and_a_video_as_its_frames_after_their_times(server):
    engine = await started(server.base_url)
    server.script = [{"content": "A cat."}]
    shades = [40, 120, 200]  # one grey per frame, to tell them apart after JPEG
    frames = [np.full((96, 128, 3), shade, np.uint8) for shade in shades]
    clip = VideoClip(frames, [0.0, 1.0, 2.0], [0, 10, 20], 10.0, 25, 2.5)
    image = Image.new("RGB", (64, 48), (250, 0, 0))
    content = [{"type": "image", "image": image}, {"type": "video", "video": clip}, {"type": "text", "text": "And?"}]
    request = GenerationRequest([{"role": "user", "content": content}], image_soft_tokens=560)
    _, text, _ = await reply(engine, request)
    await engine.shutdown()
    assert text == "A cat."
    body = server.bodies[-1]
    parts = body["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["image_url", *["text", "image_url"] * 3, "text"]
    first = decode_data_url(parts[0]["image_url"]["url"])
    assert first.size == (64, 48) and np.allclose(first.getpixel((5, 5)), (250, 0, 0), atol=8)
    assert [p["text"] for p in parts[1::2]] == ["00:00", "00:01", "00:02", "And?"]
    frames = [decode_data_url(p["image_url"]["url"]) for p in parts[2:8:2]]
    assert [f.size for f in frames] == [(128, 96)] * 3
    assert [round(np.asarray(f).mean()) for f in frames] == shades
    assert body["mm_processor_kwargs"] == {"max_soft_tokens": 560}


def test_the_image_budget_is_sent_only_with_media():
    text_only = GenerationRequest([{"role": "user", "content": "hi"}], image_soft_tokens=560)
    assert "mm_processor_kwargs" not in chat_params(text_only, "m")["extra_body"]


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
async def test_reasoning_sent_apart_by_the_server_is_reasoning(server, field):
    engine = await started(server.base_url)
    server.script = [{field: "The user"}, {field: " greets."}, {"content": "Hello"}, {"content": "!"}]
    server.script_completion_tokens = 6
    reasoning, text, deltas = await reply(engine, chat("Hi"))
    assert (reasoning, text) == ("The user greets.", "Hello!")
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].metrics.output_tokens == 6  # from usage, not the 4 chunks
    assert deltas[-1].metrics.prompt_tokens == 7
    await engine.shutdown()


async def test_markers_in_the_content_are_split_when_the_server_has_no_reasoning_parser(server):
    engine = await started(server.base_url)
    server.script = [{"content": c} for c in ["<|chan", "nel>thought\nHm", "m.<chan", "nel|>Hel", "lo"]]
    server.usage = False
    reasoning, text, deltas = await reply(engine, chat("Hi"))
    assert (reasoning, text) == ("Hmm.", "Hello")
    assert deltas[-1].metrics.output_tokens == 5  # no usage chunk: one token per chunk
    await engine.shutdown()


async def test_the_first_served_model_stands_in_for_one_the_server_lacks(server):
    assert (await started(server.base_url, model="other")).served_model == "other"
    engine = await started(server.base_url, model="google/gemma-4-26B-A4B-it")
    assert engine.served_model == "tiny"
    assert "does not serve 'google/gemma-4-26B-A4B-it'" in engine.status().detail


async def test_the_remote_api_key_goes_to_the_server_and_a_refusal_names_its_flag(server):
    server.key = "sk-remote"

    def engine(key: str) -> OpenAIEngine:
        return OpenAIEngine(
            EngineSettings(model="tiny", backend="openai", base_url=server.base_url, remote_api_key=key)
        )

    await engine("sk-remote").start()
    with pytest.raises(EngineError, match=r"answered 401 to GET /models: .*Check --remote-api-key\."):
        await engine("sk-wrong").start()


async def test_an_unreachable_server_fails_start_with_a_clear_message():
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]  # free now, and closed (nobody listening) once the block ends
    engine = OpenAIEngine(EngineSettings(model="tiny", backend="openai", base_url=f"http://127.0.0.1:{port}/v1"))
    with pytest.raises(EngineError, match="Cannot reach an OpenAI-compatible server"):
        await engine.start()
    assert engine.status().stage is Stage.FAILED
    with pytest.raises(EngineError, match="not ready"):
        await anext(engine.generate(chat("hi")))


async def test_a_refused_request_is_an_engine_error_with_the_servers_reason(server):
    engine = await started(server.base_url)
    server.reject = (400, "max_tokens is too large")
    with pytest.raises(EngineError, match=r"refused the request \(400\).*max_tokens is too large"):
        await reply(engine, chat("Hi"))
    await engine.shutdown()


async def test_abort_from_another_task_ends_the_reply_and_the_server_side_generation(server, tiny_engine):
    engine = await started(server.base_url)
    request = chat("Talk forever.", max_tokens=LONG)
    deltas: list[Delta] = []

    async def consume() -> None:
        async for delta in engine.generate(request):
            deltas.append(delta)

    reader = asyncio.create_task(consume())
    while len(deltas) < 3:
        await asyncio.sleep(0.005)
    await engine.abort(request.request_id)  # as the UI's stop button would, while the reader waits for a chunk
    await asyncio.wait_for(reader, 5)
    assert deltas[-1].finish_reason == "abort"
    await eventually(lambda: tiny_engine.stats().running == 0)
    await engine.shutdown()


async def test_closing_the_stream_early_stops_the_server_side_generation(server, tiny_engine):
    engine = await started(server.base_url)
    stream = engine.generate(chat("Talk forever.", max_tokens=LONG))
    await anext(stream)
    await stream.aclose()
    await eventually(lambda: tiny_engine.stats().running == 0)
    *_, after = await reply(engine, chat("Hello again.", max_tokens=4))
    assert after[-1].finish_reason == "length"
    await engine.shutdown()
