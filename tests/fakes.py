"""The test doubles several test files use: Engine stand-ins for the UI, the limits and the bench's app arm,
the bench's fake arm; and the chat function's default arguments with the helpers that read its output."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from bench.workload import RequestResult
from engine.base import Delta, EngineError, EngineStats, EngineStatus, GenerationRequest, Metrics, Stage

# The chat function's additional inputs after (message, history): system prompt, thinking, max tokens,
# temperature, top-p, top-k, repetition and presence penalty, seed, image detail, and the replies' rows last.
CHAT_DEFAULTS = ("", False, 2048, 1.0, 0.95, 64, 1.0, 0.0, -1, "medium", [])


def titles(messages: list[dict]) -> list[str | None]:
    return [(m.get("metadata") or {}).get("title") for m in messages]


def texts(messages: list[dict]) -> list[str]:
    return [m["content"][0]["text"] for m in messages]


ENGINE_TTFT_S = 0.05


class FakeEngine:
    """Streams `w0 w1 ...` with optional thoughts, one token every `token_s`; records what it was asked."""

    name = "fake"
    model = "fake/gemma"

    def __init__(
        self,
        stage: Stage = Stage.READY,
        detail: str = "",
        progress: float | None = None,
        token_s: float = 0.0,
        fail_after: int | None = None,
    ):
        self._status = EngineStatus(stage, detail, progress)
        self.token_s = token_s
        self.fail_after = fail_after
        self.requests: list[GenerationRequest] = []
        self.closed_early: list[str] = []

    def status(self) -> EngineStatus:
        return self._status

    async def start(self) -> None:
        self._status = EngineStatus(Stage.READY)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        self.requests.append(request)
        n = request.sampling.max_tokens
        thoughts = 2 if request.enable_thinking else 0
        finished = False
        try:
            await asyncio.sleep(ENGINE_TTFT_S)
            for i in range(n):
                await asyncio.sleep(self.token_s)
                if i == self.fail_after:
                    raise EngineError("GPU fell off the bus")
                last = i == n - 1
                metrics = Metrics(
                    ttft_s=ENGINE_TTFT_S,
                    prompt_tokens=7,
                    output_tokens=i + 1,
                    decode_tok_s=None if i == 0 else 50.0,
                    elapsed_s=0.05 + i * 0.02,
                )
                if i < thoughts:
                    yield Delta(reasoning=f"t{i} ", finish_reason="length" if last else None, metrics=metrics)
                else:
                    yield Delta(text=f"w{i} ", finish_reason="length" if last else None, metrics=metrics)
            finished = True
        finally:
            if not finished:
                self.closed_early.append(request.request_id)

    async def abort(self, request_id: str) -> None:
        self.closed_early.append(request_id)

    def stats(self) -> EngineStats:
        return EngineStats(
            kv_cache_usage=0.25, running=1, waiting=0, gpu_memory_used_gib=70.0, gpu_memory_total_gib=80.0
        )

    async def shutdown(self) -> None:
        pass


class FlakyEngine(FakeEngine):
    """Fails its first start, as a dead engine would; starts fine after that."""

    def __init__(self):
        super().__init__(Stage.FAILED, "CUDA error: an illegal memory access")
        self.starts = self.shutdowns = 0

    async def start(self) -> None:
        self.starts += 1
        await asyncio.sleep(0.05)
        if self.starts == 1:
            raise EngineError("still broken")
        self._status = EngineStatus(Stage.READY)

    async def shutdown(self) -> None:
        self.shutdowns += 1


class ContextEngine(FakeEngine):
    """Knows its context, and counts a prompt's tokens as its words."""

    max_model_len = 10

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return sum(len(str(m["content"]).split()) for m in request.messages)


class PacedEngine:
    """Loading for `load_s` after it is made, then streams ` w1 w2 ...` in real time (the first token after
    20 ms, then one every 4 ms) with the rates it measured; reports no stats. For the bench's app arm."""

    name, model = "fake", "fake-model"

    def __init__(self, load_s: float):
        self.t0, self.load_s = time.time(), load_s

    def status(self) -> EngineStatus:
        ready = time.time() - self.t0 > self.load_s
        return EngineStatus(Stage.READY if ready else Stage.LOADING, "fake")

    async def start(self) -> None:
        pass

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        n, t0 = request.sampling.max_tokens, time.perf_counter()
        await asyncio.sleep(0.02)
        first = time.perf_counter()
        for i in range(1, n + 1):
            now = time.perf_counter()
            rate = (i - 1) / (now - first) if i > 1 else None
            m = Metrics(ttft_s=first - t0, prompt_tokens=11, output_tokens=i, decode_tok_s=rate, elapsed_s=now - t0)
            yield Delta(text=f" w{i}", metrics=m, finish_reason="length" if i == n else None)
            await asyncio.sleep(0.004)

    async def abort(self, request_id: str) -> None:
        pass

    def stats(self) -> EngineStats:
        return EngineStats()

    async def shutdown(self) -> None:
        pass


class FakeArm:
    """A bench arm answering every request at ~2000 tok/s after 5 ms."""

    def __init__(self):
        self.notes = ["fake engine"]
        self.info = {"max_model_len": 4096}
        self.start_origin = None
        self.seen: list[str] = []

    async def start(self):
        await asyncio.sleep(0.01)

    async def prepare(self, n):
        pass

    async def request(self, prompt, max_tokens):
        self.seen.append(prompt.text)
        t0 = time.perf_counter()
        await asyncio.sleep(0.005)
        first = time.perf_counter()
        await asyncio.sleep(max_tokens / 2000)
        last = time.perf_counter()
        return RequestResult(len(prompt.token_ids), max_tokens, t0, first, last, engine_ttft_s=first - t0)

    async def stop(self):
        pass
