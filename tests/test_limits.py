"""The limits one visitor meets before the engine is asked: the rate limiter, the context check, and what the
backends tell it (their context length, a prompt's token count, a dead engine)."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from chat.chat_view import make_chat_fn
from chat.limits import RateLimiter, fit_to_context
from engine.base import EngineStatus, GenerationRequest, SamplingOptions, Stage
from engine.settings import EngineSettings
from engine.transformers_backend import TransformersEngine
from engine.vllm_backend import VllmEngine
from tests.fakes import CHAT_DEFAULTS, ContextEngine, FakeEngine, titles

HI = [{"role": "user", "content": "Hello there, how are you today?"}]


def test_the_rate_limiter_forgets_events_older_than_a_minute():
    now = [0.0]
    limiter = RateLimiter(2, clock=lambda: now[0])
    assert limiter.wait_s("a") == 0 and limiter.wait_s("a") == 0
    now[0] = 15.0
    assert limiter.wait_s("a") == pytest.approx(45.0)
    assert limiter.wait_s("b") == 0  # per key
    now[0] = 60.0
    assert limiter.wait_s("a") == 0
    assert RateLimiter(0).wait_s("a") == 0  # 0: no limit


async def test_a_prompt_longer_than_the_context_gets_a_note_and_no_engine_call():
    engine = ContextEngine()
    outs = [out async for out in make_chat_fn(engine)({"text": "a " * 12, "files": []}, [], *CHAT_DEFAULTS)]
    assert titles(outs[-1][0]) == ["⚠️ This conversation is 12 tokens long; the model's context holds 10."]
    assert engine.requests == []


async def test_max_tokens_is_cut_to_the_room_the_context_leaves():
    request = GenerationRequest([{"role": "user", "content": "one two three"}], SamplingOptions(max_tokens=50))
    assert await fit_to_context(ContextEngine(), request) is None
    assert request.sampling.max_tokens == 7
    request.sampling.max_tokens = 50
    assert await fit_to_context(FakeEngine(), request) is None  # an engine that doesn't know: no check
    assert request.sampling.max_tokens == 50


async def test_a_count_that_fails_leaves_the_error_to_the_engine():
    class Broken(ContextEngine):
        def count_prompt_tokens(self, request: GenerationRequest) -> int:
            raise RuntimeError("no tokenizer")

    request = GenerationRequest(HI, SamplingOptions(max_tokens=50))
    assert await fit_to_context(Broken(), request) is None and request.sampling.max_tokens == 50


async def test_the_transformers_backend_knows_its_context_and_counts_prompts(tiny_model_dir: Path):
    engine = TransformersEngine(EngineSettings(model=str(tiny_model_dir), backend="transformers", max_model_len=64))
    assert engine.max_model_len is None  # unknown until loaded
    await engine.start()
    try:
        assert engine.max_model_len == 64  # --max-model-len, below the model's own 262144
        tokens = engine.count_prompt_tokens(GenerationRequest(HI))
        assert 10 < tokens < 64
        request = GenerationRequest(HI, SamplingOptions(max_tokens=1000))
        assert await fit_to_context(engine, request) is None and request.sampling.max_tokens == 64 - tokens
    finally:
        await engine.shutdown()


def test_the_vllm_backend_counts_prompts_with_the_models_tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine = VllmEngine(EngineSettings(model=str(tiny_model_dir)))
    engine._llm = types.SimpleNamespace(get_tokenizer=lambda: tokenizer, errored=False)
    prompt = engine.engine_prompt(GenerationRequest(HI))["prompt"]
    assert engine.count_prompt_tokens(GenerationRequest(HI)) == len(
        tokenizer(prompt, add_special_tokens=False)["input_ids"]
    )


def test_the_vllm_backend_tokenizes_a_text_chat_once_for_the_check_and_the_engine(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    encoded = []
    counting = types.SimpleNamespace(
        encode=lambda text, **kw: encoded.append(text) or tokenizer.encode(text, **kw),
        apply_chat_template=tokenizer.apply_chat_template,
        chat_template=tokenizer.chat_template,
    )
    engine = VllmEngine(EngineSettings(model=str(tiny_model_dir)))
    engine._llm = types.SimpleNamespace(get_tokenizer=lambda: counting, errored=False)
    request = GenerationRequest(HI)
    tokens = engine.count_prompt_tokens(request)
    prompt = engine.engine_prompt(request)  # what generate() sends to vLLM
    assert prompt["prompt_token_ids"] == tokenizer(prompt["prompt"], add_special_tokens=False)["input_ids"]
    assert len(prompt["prompt_token_ids"]) == tokens and len(encoded) == 1
    for _ in range(200):  # requests refused after their check leave no more than a few prompts behind
        engine.count_prompt_tokens(GenerationRequest(HI))
    assert len(engine._counted) <= 64


def test_a_dead_vllm_engine_shows_as_failed():
    engine = VllmEngine(EngineSettings())
    engine._llm = types.SimpleNamespace(errored=False)
    engine._report(EngineStatus(Stage.READY))
    assert engine.status().ready
    engine._llm.errored = True  # what AsyncLLM says once its engine core process is gone
    assert engine.status().failed and "died" in engine.status().detail
