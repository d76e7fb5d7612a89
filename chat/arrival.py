"""When a message reached the server: TTFT starts there.

Gradio's queue takes ~20 ms from the HTTP request to the chat function, which a clock started in the function
would leave out of what the sidebar shows. An ASGI middleware stamps each request as it arrives; the chat
function's wrapper (chat.history_ui) reads the stamp off its gr.Request and hands it to the chat function.
"""

from __future__ import annotations

import time
from typing import Any

import gradio as gr

ARRIVED = "gemma4_chat_arrived"  # the key in the ASGI scope's state


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
