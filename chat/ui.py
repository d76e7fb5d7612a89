"""The Gradio app, put together: the chat (chat.chat_view) with live TTFT and tok/s, and a sidebar holding the
engine's status and stats (chat.sidebar) and the saved chats (chat.history_ui). Each part is given what it
needs here; none imports another.

Only the Engine protocol is used, so every backend (vLLM, OpenAI-compatible, transformers) looks the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
from starlette.middleware import Middleware

from chat.arrival import StampArrival
from chat.chat_view import chat_interface, make_chat_fn, settings_inputs
from chat.conversation import MediaLimits
from chat.history import HistoryStore
from chat.history_ui import HistoryPanel
from chat.limits import Limits, RateLimiter
from chat.sidebar import EngineSidebar
from chat.status import EngineView, status_route
from engine.base import Engine
from engine.settings import EngineSettings

TITLE = "Gemma 4 chat"
CSS_PATH = Path(__file__).resolve().parent.parent / "assets" / "style.css"


def launch_options(view: EngineView | None = None) -> dict[str, Any]:
    """`Blocks.launch` arguments: styling (Gradio 6 takes theme and CSS there), the arrival stamp, and with
    `view` (the one build_ui was given) the /status route."""
    app_kwargs: dict[str, Any] = {"middleware": [Middleware(StampArrival)]}
    if view is not None:
        app_kwargs["routes"] = [status_route(view)]
    return {"theme": gr.themes.Soft(), "css_paths": [CSS_PATH], "app_kwargs": app_kwargs}


def build_ui(
    engine: Engine,
    settings: EngineSettings,
    store: HistoryStore | None = None,
    limits: Limits | None = None,
    view: EngineView | None = None,
) -> gr.Blocks:
    """The app; `store` keeps each browser's (or login's) chats, without it nothing is saved. `view`: the
    engine's view for the sidebar, to be served at /status too (see launch_options); one of its own without."""
    limits = limits or Limits()
    view = view or EngineView(engine)
    with gr.Blocks(title=TITLE, fill_height=True, analytics_enabled=False) as demo:
        replies = gr.State([])  # this conversation's reply stats, for the plots
        with gr.Sidebar(width=360):
            sidebar = EngineSidebar(view, TITLE)
            history = HistoryPanel(store, RateLimiter(limits.rate_per_minute))
        inner = make_chat_fn(engine, MediaLimits.from_settings(settings), on_reply=view.record)
        chat = chat_interface(
            history.chat_fn(inner, lambda: engine.status().ready),
            engine.model,
            inputs=[*settings_inputs(settings), replies, *history.inputs],
            outputs=[*sidebar.metrics, replies, *history.outputs],
        )
        sidebar.wire(replies)
        chat.chatbot.clear(lambda: [], None, replies, api_visibility="private")
        history.wire(demo, chat, replies)
    return demo
