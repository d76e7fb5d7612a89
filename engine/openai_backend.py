"""A model served elsewhere over the OpenAI chat API, e.g. `vllm serve` on a DGX Spark.

The extra request fields (top_k, repetition_penalty, chat_template_kwargs, skip_special_tokens) are
vLLM's; other OpenAI-compatible servers mostly ignore what they do not know. TTFT and decode speed are
measured here at the client, so they include the network.
"""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import openai
from openai.types.chat import ChatCompletionChunk
from PIL import Image

from engine.base import Delta, EngineError, EngineStats, EngineStatus, GenerationRequest, Stage
from engine.metrics import RequestClock
from engine.prompt import content_parts
from engine.reasoning import ReasoningSplitter
from engine.settings import EngineSettings
from media import format_timestamp

_CHECK_TIMEOUT_S = 10.0


@dataclass
class _Active:
    """A request being streamed, so abort() can find and close its stream."""

    loop: asyncio.AbstractEventLoop
    stream: openai.AsyncStream[ChatCompletionChunk] | None = None  # once the server answered
    aborted: bool = False


class OpenAIEngine:
    name = "openai"

    def __init__(self, settings: EngineSettings):
        self.settings = settings
        self.model = settings.model
        self.served_model: str | None = None  # what requests name: settings.model if served, else the first served
        self._status = EngineStatus(Stage.RESOLVING, f"connecting to {settings.base_url}")
        # HTTP clients are bound to the event loop they first ran on, and start() and generate() may run on
        # different loops: generate() keeps one client for the loop it is called on.
        self._client: tuple[asyncio.AbstractEventLoop, openai.AsyncOpenAI] | None = None
        self._active: dict[str, _Active] = {}

    def status(self) -> EngineStatus:
        return self._status

    def _new_client(self, **options: Any) -> openai.AsyncOpenAI:
        key = self.settings.remote_api_key or "EMPTY"
        return openai.AsyncOpenAI(base_url=self.settings.base_url, api_key=key, **options)

    async def start(self) -> None:
        try:
            served = await self._served_models()
        except EngineError as e:
            self._status = EngineStatus(Stage.FAILED, str(e))
            raise
        if self.settings.model in served:
            self.served_model, note = self.settings.model, ""
        else:
            self.served_model = served[0]
            note = f" (the server does not serve {self.settings.model!r})"
        self._status = EngineStatus(Stage.READY, f"{self.served_model} at {self.settings.base_url}{note}")

    async def _served_models(self) -> list[str]:
        url = self.settings.base_url
        if not url:
            raise EngineError("The openai backend needs the server's address: --base-url http://HOST:PORT/v1")
        # A client of its own, closed here: this may be another event loop than generate()'s.
        async with self._new_client(max_retries=0, timeout=_CHECK_TIMEOUT_S) as client:
            try:
                page = await client.models.list()
            except openai.APIConnectionError as e:  # refused, unresolvable, timed out
                raise EngineError(
                    f"Cannot reach an OpenAI-compatible server at {url} ({e}). Is it running, and is the URL "
                    "right (it usually ends in /v1)?"
                ) from e
            except openai.APIStatusError as e:
                hint = " Check --remote-api-key." if e.status_code in (401, 403) else ""
                raise EngineError(f"{url} answered {e.status_code} to GET /models: {e.message}.{hint}") from e
        served = [model.id for model in page.data]
        if not served:
            raise EngineError(f"The server at {url} serves no models.")
        return served

    def _loop_client(self) -> openai.AsyncOpenAI:
        loop = asyncio.get_running_loop()
        if self._client is None or self._client[0] is not loop:
            self._client = (loop, self._new_client())
        return self._client[1]

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        if self.served_model is None:
            raise EngineError(f"The engine is not ready: {self._status.stage.value} {self._status.detail}")
        client = self._loop_client()
        clock = RequestClock()
        active = _Active(asyncio.get_running_loop())
        self._active[request.request_id] = active
        splitter = ReasoningSplitter()
        finish: str | None = None
        try:
            active.stream = await client.chat.completions.create(**chat_params(request, self.served_model))
            if active.aborted:  # abort() came while the request was being sent
                await active.stream.close()
            async for chunk in active.stream:
                if chunk.usage is not None:  # the last chunk, asked for with stream_options include_usage
                    clock.prompt_tokens = chunk.usage.prompt_tokens
                    clock.output_tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    delta = choice.delta
                    # vLLM with a reasoning parser sends the thinking apart (`reasoning`; `reasoning_content`
                    # before 0.10); without one, the markers are in the content and the splitter finds them.
                    server_reasoning = getattr(delta, "reasoning", None) or getattr(delta, "reasoning_content", None)
                    reasoning, text = splitter.feed(delta.content or "")
                    reasoning = (server_reasoning or "") + reasoning
                    if server_reasoning or delta.content:
                        clock.tokens_arrived(1)  # a token per chunk until usage gives the true count
                    finish = choice.finish_reason or finish
                    if reasoning or text:
                        yield Delta(text, reasoning, None, clock.metrics())
        except Exception as e:
            if active.aborted:
                pass  # abort() closed the stream under the reader: the reply ends as aborted, not failed
            elif isinstance(e, openai.APIStatusError):
                raise EngineError(f"The server refused the request ({e.status_code}): {e.message}") from e
            elif isinstance(e, openai.APIConnectionError):
                raise EngineError(f"Lost the connection to {self.settings.base_url}: {e}") from e
            elif isinstance(e, openai.APIError):
                raise EngineError(f"The server reported an error: {e.message}") from e
            else:
                raise
        finally:
            self._active.pop(request.request_id, None)
            if active.stream is not None:
                await active.stream.close()  # a consumer that stops early aborts the request on the server

        if active.aborted:
            finish = "abort"
        elif finish is None:
            raise EngineError("The server ended the stream before the reply was finished.")
        reasoning, text = splitter.flush()
        yield Delta(text, reasoning, finish, clock.metrics())

    async def abort(self, request_id: str) -> None:
        active = self._active.get(request_id)
        if active is None:
            return
        active.aborted = True
        if active.stream is None:
            return
        if active.loop is asyncio.get_running_loop():
            await active.stream.close()
        else:
            asyncio.run_coroutine_threadsafe(active.stream.close(), active.loop)

    def stats(self) -> EngineStats:
        return EngineStats()  # the server's queue and memory are not visible through the OpenAI API

    async def shutdown(self) -> None:
        for request_id in list(self._active):
            await self.abort(request_id)
        if self._client is not None and self._client[0] is asyncio.get_running_loop():
            await self._client[1].close()
        self._client = None


def openai_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's messages in the OpenAI format: images as `image_url` data URLs, a video as its frames.

    Each frame goes as an image after a text part with its mm:ss time, the way Gemma 4 itself lays out a
    video. Not a `video_url`: servers without video input take frames too, and the model sees exactly the
    frames the app chose and showed, where a server given the file would sample its own. The cost: a frame
    counts against the server's image limit and takes an image's token budget (Gemma 4 gives a video frame 70).
    """
    converted = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            converted.append({"role": message["role"], "content": content})
            continue
        parts: list[dict[str, Any]] = []
        for part in content:
            if part["type"] == "text":
                parts.append({"type": "text", "text": part["text"]})
            elif part["type"] == "image":
                parts.append(_image_part(part["image"]))
            elif part["type"] == "video":
                clip = part["video"]
                for frame, seconds in zip(clip.frames, clip.timestamps_s, strict=True):
                    parts.append({"type": "text", "text": format_timestamp(seconds)})
                    parts.append(_image_part(Image.fromarray(frame)))
            else:
                raise EngineError(f"The openai backend cannot send {part['type']} input.")
        converted.append({"role": message["role"], "content": parts})
    return converted


def _image_part(image: Image.Image) -> dict[str, Any]:
    # JPEG, not PNG: every turn resends the conversation's images, and a 4 MP PNG is ~10 MB of base64.
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": url}}


def chat_params(request: GenerationRequest, model: str) -> dict[str, Any]:
    sampling = request.sampling
    extra: dict[str, Any] = {
        "repetition_penalty": sampling.repetition_penalty,
        "chat_template_kwargs": {"enable_thinking": request.enable_thinking},
        # Keeps Gemma 4's channel markers in the content when the server has no reasoning parser.
        "skip_special_tokens": False,
    }
    if sampling.top_k > 0:
        extra["top_k"] = sampling.top_k
    if request.image_soft_tokens and _has_media(request.messages):
        # vLLM's per-request image budget; it applies to video frames too, as they go as images.
        extra["mm_processor_kwargs"] = {"max_soft_tokens": request.image_soft_tokens}
    params: dict[str, Any] = {
        "model": model,
        "messages": openai_messages(request.messages),
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_completion_tokens": sampling.max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "presence_penalty": sampling.presence_penalty,
        "extra_body": extra,
    }
    if sampling.seed is not None:
        params["seed"] = sampling.seed
    return params


def _has_media(messages: list[dict[str, Any]]) -> bool:
    return any(part["type"] != "text" for message in messages for part in content_parts(message["content"]))
