"""The Gradio app: a chat with live TTFT and tok/s, the engine's load status and stats in a sidebar.

Only the Engine protocol is used here, so every backend (vLLM, OpenAI-compatible, transformers) looks the same.
"""

from __future__ import annotations

import asyncio
import dataclasses
import html
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
from gradio.processing_utils import save_pil_to_cache
from gradio.utils import get_upload_folder
from starlette.middleware import Middleware

from chat.conversation import (
    MediaLimits,
    Prompt,
    Reply,
    ReplyStats,
    UnsupportedContent,
    build_prompt,
    format_details,
    format_stats,
)
from chat.history import HistoryStore
from chat.limits import Limits, RateLimiter, fit_to_context
from engine import lifecycle
from engine.base import Engine, EngineStats, EngineStatus, GenerationRequest, SamplingOptions
from engine.settings import EngineSettings
from media import DEFAULT_IMAGE_DETAIL, IMAGE_DETAIL_SOFT_TOKENS, format_timestamp

log = logging.getLogger(__name__)

TITLE = "Gemma 4 chat"
CSS_PATH = Path(__file__).resolve().parent.parent / "assets" / "style.css"
# Re-rendering the whole chat for every token costs the server CPU that streaming needs; 20 updates
# a second look just as live.
UI_REFRESH_S = 0.05
POLL_S = 1.0
MODEL_CONTEXT = 262144  # Gemma 4 26B-A4B's context: the max tokens cap when --max-model-len is auto

ChatOutput = tuple[Any, ...]  # (messages, ttft, tok/s, tokens, replies)


def launch_options() -> dict[str, Any]:
    """`Blocks.launch` arguments: styling (Gradio 6 takes theme and CSS there) and the arrival stamp."""
    return {
        "theme": gr.themes.Soft(),
        "css_paths": [CSS_PATH],
        "app_kwargs": {"middleware": [Middleware(StampArrival)]},
    }


# TTFT starts when the message reached the server: Gradio's queue takes ~20 ms from there to the chat
# function, which a clock started in the function would leave out of what the sidebar shows.
ARRIVED = "gemma4_chat_arrived"
MESSAGE_ARRIVED: ContextVar[float | None] = ContextVar("message_arrived", default=None)


class StampArrival:
    """ASGI middleware: stamps each HTTP request with the time.monotonic() at which it reached the server."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {})[ARRIVED] = time.monotonic()
        await self.app(scope, receive, send)


def arrived(request: gr.Request | None) -> float | None:
    """When the request carrying the message reached the server (None where no stamp was made)."""
    scope = getattr(getattr(request, "request", None), "scope", None) or {}
    return (scope.get("state") or {}).get(ARRIVED)


def _text(text: str) -> list[dict[str, str]]:
    # A typed text part, not a bare string: Gradio runs bare strings through inspect.cleandoc, which
    # would strip the indentation of code in the reply.
    return [{"type": "text", "text": text}]


def _note(title: str, body: str = "") -> dict[str, Any]:
    """An assistant message that is the UI's own remark; titled, so it never reaches the model."""
    return {"role": "assistant", "content": _text(body or title), "metadata": {"title": title, "status": "done"}}


def reply_messages(reply: Reply, done: bool) -> list[dict[str, Any]]:
    """The chat messages showing a reply: collapsed thoughts, the answer, an error note, its stats."""
    messages: list[dict[str, Any]] = []
    if reply.reasoning:
        metadata: dict[str, Any] = {"title": "Thinking", "status": "pending" if reply.thinking and not done else "done"}
        if reply.reasoning_s is not None:
            metadata["duration"] = round(reply.reasoning_s, 1)
        messages.append({"role": "assistant", "content": _text(reply.reasoning), "metadata": metadata})
    if reply.text:
        messages.append({"role": "assistant", "content": _text(reply.text)})
    if reply.error:
        kept = "The partial answer above is kept; " if reply.text else ""
        messages.append(_note(f"⚠️ {reply.error}", f"{kept}press retry to try again."))
    if done and reply.metrics.output_tokens:
        messages.append(_note(format_stats(reply.stats), format_details(reply.stats)))
    return messages


def media_messages(prompt: Prompt) -> list[dict[str, Any]]:
    """Notes on the new message's attachments: the frames the model sees of each video, then other remarks.

    Titled without a status, so the chat shows them open; being titled, they never reach the model.
    """
    messages: list[dict[str, Any]] = []
    for name, clip in prompt.videos:
        stamps = [format_timestamp(t) for t in clip.timestamps_s]
        # Written into Gradio's cache, which serves it as is, rather than a temp file it would copy there.
        sheet = save_pil_to_cache(clip.contact_sheet(), get_upload_folder(), f"{Path(name).stem}-frames", "png")
        body = "Frames at " + ", ".join(stamps) + "".join(f"\n\n{note}" for note in clip.notes)
        span = stamps[0] if len(stamps) == 1 else f"{stamps[0]}–{stamps[-1]}"
        title = f"🎞️ {name}: the {len(stamps)} frame{'s' * (len(stamps) > 1)} the model sees ({span})"
        messages.append({"role": "assistant", "content": [*_text(body), {"path": sheet}], "metadata": {"title": title}})
    if prompt.notes:
        body = "\n".join(f"- {note}" for note in prompt.notes)
        messages.append({"role": "assistant", "content": _text(body), "metadata": {"title": "ℹ️ About the attachments"}})
    return messages


def describe_status(status: EngineStatus) -> str:
    progress = "" if status.progress is None else f" {status.progress:.0%}"
    return f"{status.stage.value}{progress}" + (f": {status.detail}" if status.detail else "")


def status_html(engine: Engine, status: EngineStatus) -> str:
    state = "ready" if status.ready else "failed" if status.failed else "loading"
    bar = ""
    if state == "loading":
        bar = (
            f'<progress value="{status.progress:.3f}" max="1"></progress>'
            if status.progress is not None
            else "<progress></progress>"  # indeterminate: the stage has no measurable progress
        )
    progress = "" if status.progress is None or state != "loading" else f" {status.progress:.0%}"
    return (
        f'<div class="engine-status {state}">'
        f"<div><b>{html.escape(engine.name)}</b> · <code>{html.escape(engine.model)}</code></div>"
        f'<div class="stage">{html.escape(status.stage.value)}{progress}</div>'
        f"{bar}"
        f'<div class="detail">{html.escape(status.detail)}</div>'
        "</div>"
    )


def stats_markdown(stats: EngineStats) -> str:
    if stats == EngineStats():
        return "*This backend reports no load or memory stats.*"

    def show(value: Any, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    gpu = "–"
    if stats.gpu_memory_used_gib is not None:
        total = "" if stats.gpu_memory_total_gib is None else f" / {stats.gpu_memory_total_gib:.1f}"
        gpu = f"{stats.gpu_memory_used_gib:.1f}{total} GiB"
    return (
        "| | |\n|---|---|\n"
        f"| KV cache | {show(stats.kv_cache_usage, '.1%')} |\n"
        f"| running / waiting | {show(stats.running, 'd')} / {show(stats.waiting, 'd')} |\n"
        f"| GPU memory | {gpu} |"
    )


def replies_frame(replies: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per reply of this conversation, for the sidebar plots."""
    rows = [{"reply": i, "TTFT (s)": r["ttft_s"], "tok/s": r["decode_tok_s"]} for i, r in enumerate(replies, start=1)]
    # Explicit dtypes: an empty or all-None column would be `object`, which the plot draws as categories.
    return pd.DataFrame(rows, columns=["reply", "TTFT (s)", "tok/s"]).astype(
        {"reply": "int64", "TTFT (s)": "float64", "tok/s": "float64"}
    )


def make_chat_fn(engine: Engine, limits: MediaLimits | None = None) -> Callable[..., AsyncIterator[ChatOutput]]:
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
    ) -> AsyncIterator[ChatOutput]:
        """Stream Gemma 4's reply to `message`; yields (messages, TTFT s, decode tok/s, output tokens, replies)."""
        received = MESSAGE_ARRIVED.get() or time.monotonic()
        status = engine.status()
        if status.failed:
            yield [_note("❌ The engine failed to load", status.detail)], None, None, None, gr.skip()
            return
        if not status.ready:
            note = _note(
                f"⏳ The engine is still loading: {describe_status(status)}",
                "Your message is kept: press retry once the sidebar says ready.",
            )
            yield [note], None, None, None, gr.skip()
            return
        try:
            # In a thread: decoding a video takes a while, and the server's event loop must keep streaming.
            prompt = await asyncio.to_thread(build_prompt, history, message, system_prompt, limits)
        except UnsupportedContent as e:
            yield [_note(f"⚠️ {e}")], None, None, None, gr.skip()
            return
        messages, shown = prompt.messages, media_messages(prompt)
        if not messages or messages[-1]["role"] != "user":  # an empty message, possible through the API
            yield [_note("⚠️ Nothing to send: the message is empty")], None, None, None, gr.skip()
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
            note = _note(f"⚠️ {too_long}", "Nothing was sent to the model: start a new chat or send something shorter.")
            yield [*shown, note], None, None, None, gr.skip()
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
        yield *_live(reply, shown, done=True), [*replies, _stats_row(stats)] if stats.output_tokens else gr.skip()

    return chat


def _live(reply: Reply, shown: list[dict[str, Any]], done: bool) -> tuple[Any, ...]:
    m = reply.metrics
    return [*shown, *reply_messages(reply, done)], reply.ttft_s, m.decode_tok_s, m.output_tokens


def _stats_row(stats: ReplyStats) -> dict[str, Any]:
    return dataclasses.asdict(stats)  # all of it: the history keeps it to show the reply's stats line again


def build_ui(
    engine: Engine, settings: EngineSettings, store: HistoryStore | None = None, limits: Limits | None = None
) -> gr.Blocks:
    """The app; `store` keeps each browser's (or login's) chats, without it nothing is saved."""
    from chat.history_ui import HistoryPanel  # here: it builds on this module

    limits = limits or Limits()
    defaults = SamplingOptions()
    max_tokens_cap = settings.max_model_len or MODEL_CONTEXT
    with gr.Blocks(title=TITLE, fill_height=True, analytics_enabled=False) as demo:
        replies = gr.State([])  # this conversation's reply stats, for the plots
        with gr.Sidebar(width=360):
            gr.Markdown(f"## {TITLE}")
            status_view = gr.HTML(status_html(engine, engine.status()))
            restart = gr.Button("Restart the engine", variant="stop", size="sm", visible=engine.status().failed)
            engine_stats = gr.Markdown(stats_markdown(engine.stats()), elem_classes="engine-stats")
            gr.Markdown("### Reply")
            metric_args = {"interactive": False, "min_width": 70, "elem_classes": "live-metric"}
            with gr.Row():
                ttft = gr.Number(label="TTFT (s)", precision=3, **metric_args)
                tok_s = gr.Number(label="tok/s", precision=1, **metric_args)
                tokens = gr.Number(label="tokens", precision=0, **metric_args)
            gr.Markdown("### This conversation")
            plot_args = {"x": "reply", "x_axis_format": "~g", "y_axis_format": ".3~g", "buttons": []}
            tok_s_plot = gr.ScatterPlot(None, y="tok/s", label="Decode speed (tok/s)", **plot_args)
            ttft_plot = gr.ScatterPlot(None, y="TTFT (s)", label="Time to first token (s)", **plot_args)
            history = HistoryPanel(store, RateLimiter(limits.rate_per_minute))

        settings_inputs = [
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
        chat = gr.ChatInterface(
            history.chat_fn(make_chat_fn(engine, MediaLimits.from_settings(settings)), lambda: engine.status().ready),
            multimodal=True,
            chatbot=gr.Chatbot(
                label="Chat",
                scale=1,
                editable="user",
                buttons=["copy", "copy_all"],
                placeholder=f"Chat with **{html.escape(engine.model)}**",
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
            additional_inputs=[*settings_inputs, replies, *history.inputs],
            additional_inputs_accordion=gr.Accordion("Settings", open=False, render=False),
            additional_outputs=[ttft, tok_s, tokens, replies, *history.outputs],
            editable=True,
            api_name="chat",
            fill_height=True,
        )

        def plots(rows: list[dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
            frame = replies_frame(rows)
            return frame, frame

        replies.change(plots, replies, [tok_s_plot, ttft_plot], show_progress="hidden", api_visibility="private")
        chat.chatbot.clear(lambda: [], None, replies, api_visibility="private")
        history.wire(demo, chat, replies)

        def poll() -> tuple[str, str, Any]:
            status = engine.status()
            dead = status.failed and not lifecycle.restarting()
            return status_html(engine, status), stats_markdown(engine.stats()), gr.update(visible=dead)

        gr.Timer(POLL_S).tick(
            poll,
            None,
            [status_view, engine_stats, restart],
            show_progress="hidden",
            queue=False,
            api_visibility="private",
        )

        def restart_engine() -> Any:
            lifecycle.restart_in_background(engine)
            return gr.update(visible=False)

        restart.click(restart_engine, None, restart, queue=False, api_visibility="private")
    return demo
