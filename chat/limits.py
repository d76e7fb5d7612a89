"""What one visitor may ask of a shared app: messages per minute, upload size, prompt length.

Concurrency and the queue's length are Gradio's own settings (`demo.queue` in app.py); upload size is
Gradio's `max_file_size`. The rate limit and the context check are done here, before the engine is asked.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from engine.base import Engine, GenerationRequest

log = logging.getLogger(__name__)

RATE_WINDOW_S = 60.0


@dataclass(frozen=True)
class Limits:
    max_queue: int = 64  # requests waiting for a free slot; more are refused with "queue is full"
    rate_per_minute: int = 20  # messages one session may send a minute; 0: no limit
    max_upload_mb: float = 200.0  # per file; the largest video media.load_video reads is 200 MiB


class RateLimiter:
    """At most `per_minute` events per key in any 60 s window. Thread-safe."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic):
        self.per_minute = per_minute
        self._clock = clock
        self._events: dict[str, deque[float]] = {}
        self._lock = threading.Lock()
        self._swept = clock()

    def wait_s(self, key: str) -> float:
        """0 and counts the event when `key` may go ahead, else the seconds until it may."""
        if self.per_minute <= 0:
            return 0.0
        now = self._clock()
        with self._lock:
            if now - self._swept > RATE_WINDOW_S:  # forget sessions that went quiet, so the table stays small
                self._events = {k: q for k, q in self._events.items() if q and now - q[-1] < RATE_WINDOW_S}
                self._swept = now
            events = self._events.setdefault(key, deque())
            while events and now - events[0] >= RATE_WINDOW_S:
                events.popleft()
            if len(events) >= self.per_minute:
                return RATE_WINDOW_S - (now - events[0])
            events.append(now)
            return 0.0


def rate_note(per_minute: int, wait_s: float) -> str:
    return f"Slow down: at most {per_minute} messages a minute. Send this one again in {math.ceil(wait_s)} s."


async def fit_to_context(engine: Engine, request: GenerationRequest) -> str | None:
    """None when the prompt fits the engine's context, with max_tokens cut to the room left; else why not.

    Engines that know their context say so with `max_model_len` and `count_prompt_tokens(request)`;
    for the others (an OpenAI-compatible server) the server's own error is shown.
    """
    limit: int | None = getattr(engine, "max_model_len", None)
    count: Callable[[GenerationRequest], int] | None = getattr(engine, "count_prompt_tokens", None)
    if not limit or count is None:
        return None
    try:
        tokens = await asyncio.to_thread(count, request)  # a long chat takes the tokenizer a moment
    except Exception:  # the engine reports the same problem in its own words when asked to generate
        log.exception("could not count the prompt's tokens of request %s", request.request_id)
        return None
    if tokens >= limit:
        return f"This conversation is {tokens:,} tokens long; the model's context holds {limit:,}."
    request.sampling.max_tokens = min(request.sampling.max_tokens, limit - tokens)
    return None
