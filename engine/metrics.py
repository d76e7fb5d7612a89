"""Time to first token and decode speed, measured the same way for every backend."""

from __future__ import annotations

import time

from engine.base import Metrics


class RequestClock:
    """Stamps a request's submit, first-token and latest-token times.

    Decode speed counts the tokens after the first over the time since the first, so it measures
    the steady token rate and not the prompt's prefill.
    """

    def __init__(self, prompt_tokens: int = 0, now: float | None = None):
        self.submitted = time.perf_counter() if now is None else now
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.prompt_tokens = prompt_tokens
        self.output_tokens = 0

    def tokens_arrived(self, count: int, now: float | None = None) -> None:
        if count <= 0:
            return
        now = time.perf_counter() if now is None else now
        if self.first_token is None:
            self.first_token = now
        self.last_token = now
        self.output_tokens += count

    def metrics(self, now: float | None = None) -> Metrics:
        now = time.perf_counter() if now is None else now
        return decode_metrics(
            submitted=self.submitted,
            first_token=self.first_token,
            last_token=self.last_token,
            prompt_tokens=self.prompt_tokens,
            output_tokens=self.output_tokens,
            now=now,
        )


def decode_metrics(
    *,
    submitted: float,
    first_token: float | None,
    last_token: float | None,
    prompt_tokens: int,
    output_tokens: int,
    now: float,
) -> Metrics:
    return Metrics(
        ttft_s=None if first_token is None else first_token - submitted,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        decode_tok_s=decode_rate(output_tokens, first_token, last_token),
        elapsed_s=now - submitted,
    )


def decode_rate(output_tokens: int, first_token: float | None, last_token: float | None) -> float | None:
    """Tokens after the first over the time since the first; None until two tokens are apart in time."""
    if first_token is None or last_token is None or output_tokens < 2 or last_token <= first_token:
        return None
    return (output_tokens - 1) / (last_token - first_token)
