"""TTFT and decode speed: the numbers the sidebar promises, computed one way for every backend."""

import pytest

from engine.metrics import RequestClock, decode_rate


def test_ttft_is_submit_to_first_token_and_decode_rate_excludes_the_first_token():
    clock = RequestClock(prompt_tokens=12, now=10.0)
    clock.tokens_arrived(1, now=10.25)  # prefill done: the first token
    for step in range(1, 11):
        clock.tokens_arrived(1, now=10.25 + step * 0.02)  # ten more tokens, 20 ms apart
    metrics = clock.metrics(now=10.5)
    assert metrics.ttft_s == pytest.approx(0.25)
    assert metrics.output_tokens == 11
    assert metrics.decode_tok_s == pytest.approx(50.0)
    assert metrics.prompt_tokens == 12
    assert metrics.elapsed_s == pytest.approx(0.5)


def test_no_rate_before_two_tokens_apart_in_time():
    clock = RequestClock(now=0.0)
    assert clock.metrics(now=1.0).ttft_s is None
    clock.tokens_arrived(1, now=0.1)
    assert clock.metrics(now=0.2).decode_tok_s is None
    assert decode_rate(5, 1.0, 1.0) is None


def test_chunks_of_several_tokens_count_every_token():
    clock = RequestClock(now=0.0)
    clock.tokens_arrived(4, now=1.0)
    clock.tokens_arrived(0, now=1.5)  # an empty chunk changes nothing
    clock.tokens_arrived(5, now=2.0)
    assert clock.metrics(now=2.0).output_tokens == 9
    assert clock.metrics(now=2.0).decode_tok_s == pytest.approx(8.0)
