"""The sidebar's engine part: its load status and stats (polled), the restart button, the last reply's live
numbers and this conversation's plots. It is given the engine's view (chat.status) and nothing else of it.
"""

from __future__ import annotations

import html
from typing import Any

import gradio as gr
import pandas as pd

from chat.status import EngineSnapshot, EngineView
from engine.base import EngineStats

POLL_S = 1.0


def status_html(snapshot: EngineSnapshot) -> str:
    state = "ready" if snapshot.ready else "failed" if snapshot.failed else "loading"
    bar = ""
    if state == "loading":
        bar = (
            f'<progress value="{snapshot.progress:.3f}" max="1"></progress>'
            if snapshot.progress is not None
            else "<progress></progress>"  # indeterminate: the stage has no measurable progress
        )
    progress = "" if snapshot.progress is None or state != "loading" else f" {snapshot.progress:.0%}"
    return (
        f'<div class="engine-status {state}">'
        f"<div><b>{html.escape(snapshot.backend)}</b> · <code>{html.escape(snapshot.model)}</code></div>"
        f'<div class="stage">{html.escape(snapshot.stage)}{progress}</div>'
        f"{bar}"
        f'<div class="detail">{html.escape(snapshot.detail)}</div>'
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
    """One row per reply of this conversation, for the plots."""
    rows = [{"reply": i, "TTFT (s)": r["ttft_s"], "tok/s": r["decode_tok_s"]} for i, r in enumerate(replies, start=1)]
    # Explicit dtypes: an empty or all-None column would be `object`, which the plot draws as categories.
    return pd.DataFrame(rows, columns=["reply", "TTFT (s)", "tok/s"]).astype(
        {"reply": "int64", "TTFT (s)": "float64", "tok/s": "float64"}
    )


class EngineSidebar:
    """Create it inside the sidebar (it renders there), give the chat function's live numbers `metrics` as
    outputs, then `wire` it to the conversation's stats rows."""

    def __init__(self, view: EngineView, title: str):
        self.view = view
        snapshot = view.snapshot()
        gr.Markdown(f"## {title}")
        self.status = gr.HTML(status_html(snapshot))
        self.restart = gr.Button("Restart the engine", variant="stop", size="sm", visible=snapshot.failed)
        self.stats = gr.Markdown(stats_markdown(snapshot.stats), elem_classes="engine-stats")
        gr.Markdown("### Reply")
        metric_args = {"interactive": False, "min_width": 70, "elem_classes": "live-metric"}
        with gr.Row():
            ttft = gr.Number(label="TTFT (s)", precision=3, **metric_args)
            tok_s = gr.Number(label="tok/s", precision=1, **metric_args)
            tokens = gr.Number(label="tokens", precision=0, **metric_args)
        self.metrics = [ttft, tok_s, tokens]  # the chat function's (ttft, tok/s, tokens)
        gr.Markdown("### This conversation")
        plot_args = {"x": "reply", "x_axis_format": "~g", "y_axis_format": ".3~g", "buttons": []}
        self.tok_s_plot = gr.ScatterPlot(None, y="tok/s", label="Decode speed (tok/s)", **plot_args)
        self.ttft_plot = gr.ScatterPlot(None, y="TTFT (s)", label="Time to first token (s)", **plot_args)

    def wire(self, replies: gr.State) -> None:
        """The plots follow `replies` (the conversation's stats rows); the status and stats follow the engine."""
        quiet: dict[str, Any] = {"show_progress": "hidden", "api_visibility": "private"}

        def plots(rows: list[dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
            frame = replies_frame(rows)
            return frame, frame

        replies.change(plots, replies, [self.tok_s_plot, self.ttft_plot], **quiet)

        def poll() -> tuple[str, str, Any]:
            snapshot = self.view.snapshot()
            dead = snapshot.failed and not snapshot.restarting
            return status_html(snapshot), stats_markdown(snapshot.stats), gr.update(visible=dead)

        gr.Timer(POLL_S).tick(poll, None, [self.status, self.stats, self.restart], queue=False, **quiet)

        def restart() -> Any:
            self.view.restart()
            return gr.update(visible=False)

        self.restart.click(restart, None, self.restart, queue=False, api_visibility="private")
