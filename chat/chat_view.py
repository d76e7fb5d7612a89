"""The chat itself: the function that streams Gemma 4's reply with its live TTFT and tok/s, the settings it
takes, and the ChatInterface around it. Given the Engine (it generates) and the media limits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import html
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import gradio as gr

from chat.conversation import MediaLimits, Reply, ReplyStats, UnsupportedContent, build_prompt
from chat.limits import fit_to_context
from chat.messages import media_messages, note, reply_messages
from chat.status import describe
from engine.base import Engine, GenerationRequest, SamplingOptions
from engine.settings import EngineSettings
from media import DEFAULT_IMAGE_DETAIL, IMAGE_DETAIL_SOFT_TOKENS

log = logging.getLogger(__name__)

# Re-rendering the whole chat for every token costs the server CPU that streaming needs; 20 updates
# a second look just as live.
UI_REFRESH_S = 0.05
MODEL_CONTEXT = 262144  # Gemma 4 26B-A4B's context: the max tokens cap when --max-model-len is auto

ChatOutput = tuple[Any, ...]  # (messages, ttft, tok/s, tokens, replies)


def make_chat_fn(
    engine: Engine, limits: MediaLimits | None = None, on_reply: Callable[[ReplyStats], None] | None = None
) -> Callable[..., AsyncIterator[ChatOutput]]:
    """The chat function; `on_reply` gets each finished reply's stats (the app's last reply, for /status)."""
    limits = limits or MediaLimits()

    async def chat(
        message: dict[str, Any] | str,
        history: list[dict[str, Any]],
        system_prompt: str,
        enable_thinking: bool,
        max_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        repetition_penalty: float,
        presence_penalty: float,
        seed: int | None,
        image_detail: str,
        replies: list[dict[str, Any]],
        *,
        received: float | None = None,
    ) -> AsyncIterator[ChatOutput]:
        """Stream Gemma 4's reply to `message`; yields (messages, TTFT s, decode tok/s, output tokens, replies).

        `received`: the time.monotonic() at which the message reached the server (chat.arrival), where TTFT
        starts; without it, now.
        """
        received = received or time.monotonic()
        status = engine.status()
        if status.failed:
            yield [note("❌ The engine failed to load", status.detail)], None, None, None, gr.skip()
            return
        if not status.ready:
            loading = note(
                f"⏳ The engine is still loading: {describe(status)}",
                "Your message is kept: press retry once the sidebar says ready.",
            )
            yield [loading], None, None, None, gr.skip()
            return
        try:
            # In a thread: decoding a video takes a while, and the server's event loop must keep streaming.
            prompt = await asyncio.to_thread(build_prompt, history, message, system_prompt, limits)
        except UnsupportedContent as e:
            yield [note(f"⚠️ {e}")], None, None, None, gr.skip()
            return
        messages, shown = prompt.messages, media_messages(prompt)
        if not messages or messages[-1]["role"] != "user":  # an empty message, possible through the API
            yield [note("⚠️ Nothing to send: the message is empty")], None, None, None, gr.skip()
            return
        request = GenerationRequest(
            messages=messages,
            sampling=SamplingOptions(
                temperature=temperature,
                top_p=top_p,
                top_k=int(top_k),
                max_tokens=int(max_tokens),
                repetition_penalty=repetition_penalty,
                presence_penalty=presence_penalty,
                seed=None if seed is None or seed < 0 else int(seed),
            ),
            enable_thinking=enable_thinking,
            image_soft_tokens=IMAGE_DETAIL_SOFT_TOKENS[image_detail],
        )
        if too_long := await fit_to_context(engine, request):
            nothing_sent = "Nothing was sent to the model: start a new chat or send something shorter."
            refused = note(f"⚠️ {too_long}", nothing_sent)
            yield [*shown, refused], None, None, None, gr.skip()
            return
        reply = Reply(received=received)
        last_shown = 0.0
        # Closing the engine's stream aborts the request. Gradio's stop button cancels the task running
        # this generator (or closes it between yields); either way `aclosing` closes the stream.
        async with aclosing(engine.generate(request)) as stream:
            try:
                async for delta in stream:
                    reply.add(delta)
                    now = time.monotonic()
                    if delta.finish_reason is None and now - last_shown >= UI_REFRESH_S:
                        last_shown = now
                        yield *_live(reply, shown, done=False), gr.skip()
            except Exception as e:  # keep what streamed so far and say what went wrong
                log.exception("request %s failed", request.request_id)
                reply.error = f"The engine failed mid-reply: {e}"
            except (asyncio.CancelledError, GeneratorExit):
                log.info(
                    "request %s stopped by the user after %d tokens: aborting it",
                    request.request_id,
                    reply.metrics.output_tokens,
                )
                raise
        if reply.finish_reason == "error" and not reply.error:
            reply.error = "The engine stopped this reply with an error (see the server log)."
        stats = reply.stats
        if stats.output_tokens and on_reply is not None:
            on_reply(stats)
        # All of the stats: the history keeps them to show the reply's stats line again.
        rows = [*replies, dataclasses.asdict(stats)] if stats.output_tokens else gr.skip()
        yield *_live(reply, shown, done=True), rows

    return chat


def _live(reply: Reply, shown: list[dict[str, Any]], done: bool) -> tuple[Any, ...]:
    m = reply.metrics
    return [*shown, *reply_messages(reply, done)], reply.ttft_s, m.decode_tok_s, m.output_tokens


def settings_inputs(settings: EngineSettings) -> list[gr.components.Component]:
    """The Settings accordion's controls, unrendered, in the chat function's order (system prompt to image
    detail); the max tokens slider goes up to the context."""
    defaults = SamplingOptions()
    max_tokens_cap = settings.max_model_len or MODEL_CONTEXT
    return [
        gr.Textbox("", label="System prompt", lines=2, placeholder="You are a helpful assistant.", render=False),
        gr.Checkbox(label="Thinking", value=False, info="Let Gemma 4 reason before it answers", render=False),
        gr.Slider(1, max_tokens_cap, value=defaults.max_tokens, step=1, label="Max tokens", render=False),
        gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05, label="Temperature", render=False),
        gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.01, label="Top-p", render=False),
        gr.Slider(0, 200, value=defaults.top_k, step=1, label="Top-k", info="0: off", render=False),
        gr.Slider(1.0, 2.0, value=defaults.repetition_penalty, step=0.01, label="Repetition penalty", render=False),
        gr.Slider(-2.0, 2.0, value=defaults.presence_penalty, step=0.1, label="Presence penalty", render=False),
        gr.Number(-1, label="Seed", info="-1: random", precision=0, minimum=-1, render=False),
        gr.Dropdown(
            [(f"{name} · {tokens} tokens an image", name) for name, tokens in IMAGE_DETAIL_SOFT_TOKENS.items()],
            value=DEFAULT_IMAGE_DETAIL,
            label="Image detail",
            info="Gemma 4's token budget per image: more sees finer detail, costs prompt length",
            render=False,
        ),
    ]


def chat_interface(
    fn: Callable[..., AsyncIterator[Any]], model: str, inputs: list[Any], outputs: list[Any]
) -> gr.ChatInterface:
    """The chat, with `fn` streaming into it; `inputs` and `outputs`: fn's additional ones, in its order."""
    return gr.ChatInterface(
        fn,
        multimodal=True,
        chatbot=gr.Chatbot(
            label="Chat",
            scale=1,
            editable="user",
            buttons=["copy", "copy_all"],
            placeholder=f"Chat with **{html.escape(model)}**",
        ),
        textbox=gr.MultimodalTextbox(
            placeholder="Message Gemma 4…",
            sources=["upload"],
            # Any file: media judges each by its content and answers what it can't read in the chat.
            file_count="multiple",
            autofocus=True,
            stop_btn=True,
            max_plain_text_length=1_000_000,  # long pastes stay text instead of turning into a file
            scale=7,
        ),
        additional_inputs=inputs,
        additional_inputs_accordion=gr.Accordion("Settings", open=False, render=False),
        additional_outputs=outputs,
        editable=True,
        api_name="chat",
        fill_height=True,
    )
